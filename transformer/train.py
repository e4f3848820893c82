"""Train the Transformer to translate English -> Spanish on Tatoeba.

    python transformer/train.py                    # the default run of the README's results table
    python transformer/train.py --resume           # go on from runs/transformer/last.pt
    python transformer/train.py --quick            # a smaller model for one epoch: about 4 minutes on 2 CPU cores
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError
from transformer.decoding import translate
from transformer.model import Transformer, TransformerConfig
from transformer.prepare import (
    PAD_ID,
    collate,
    encode_pairs,
    load_pairs,
    load_tokenizer,
    split_pairs,
    token_batches,
    train_tokenizer,
)
from transformer.runs import (
    EXIT_INTERRUPTED,
    CheckpointError,
    RunError,
    StopFlag,
    check_run_folder,
    int_in_range,
    load_checkpoint,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    refuse_changed_settings,
    remove_run_files,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    seed_int,
    warn_if_threads_changed,
    write_text_atomically,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHECKPOINT_KIND = "transformer-translation"

# The settings that define a run: a resume refuses a change of any of them (--seed would re-split the data, so old
# test pairs would become training pairs). --epochs, --max-steps and --valid-every may change: the learning-rate
# schedule does not depend on them, so a finished run can be resumed with a larger --epochs.
FIXED_ON_RESUME = (
    "quick", "max_tokens", "max_len", "vocab_size", "d_model", "num_heads", "encoder_layers", "decoder_layers", "d_ff",
    "dropout", "pre_norm", "attention", "average_decay", "label_smoothing", "schedule", "warmup_steps", "lr_factor",
    "lr", "train_fraction", "valid_pairs", "valid_bleu_sentences", "seed",
)
# What --resume reads from last.pt besides the fields of every checkpoint.
RESUME_KEYS = ("optimizer", "epoch", "batch_in_epoch", "best_bleu", "records", "train_args")
# The files a training run writes into its --out-dir (--overwrite removes exactly these; eval.py's heat-map too).
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "curves.png",
             "attention.png")


def label_smoothed_cross_entropy(logits, target, smoothing: float, pad_id: int = PAD_ID) -> torch.Tensor:
    """Mean over non-pad tokens of -(1 - eps) log p(y) - eps * mean_v log p(v): the target keeps 1 - eps of the
    probability mass and eps is spread evenly over the whole vocabulary (eq. 10)."""
    log_probs = logits.log_softmax(dim=-1)  # (N, V)
    true_token = -log_probs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    uniform = -log_probs.mean(dim=-1)  # (N,)
    loss = (1.0 - smoothing) * true_token + smoothing * uniform
    keep = target != pad_id
    return loss[keep].mean()


def learning_rate(step: int, args) -> float:
    """Eq. 9 ("Noam"): d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), times --lr-factor; or a constant --lr."""
    if args.schedule == "constant":
        return args.lr
    step = max(step, 1)
    return args.lr_factor * args.d_model**-0.5 * min(step**-0.5, step * args.warmup_steps**-1.5)


class WeightAverage:
    """An exponential moving average of the weights, the cheap cousin of the paper's checkpoint averaging.

    The paper translates with the average of its last 5 (or 20) checkpoints; here every optimizer step folds the
    weights in: average <- d * average + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)) after n updates,
    so that the random initial weights are forgotten quickly. The average is what validation scores and what
    best.pt holds; the raw weights keep training.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                self.weights[name].lerp_(tensor, 1.0 - decay)  # average + (1 - d) * (weights - average)
            else:
                self.weights[name].copy_(tensor)

    def swapped_into(self, model: torch.nn.Module) -> dict:
        """Load the averaged weights into the model; return the raw ones so the caller can put them back."""
        raw = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        model.load_state_dict(self.weights)
        return raw


def load_run_checkpoint(path, required=()) -> dict:
    """A checkpoint written by this script (on the CPU), or one line saying why the file is not one."""
    checkpoint = load_checkpoint(path, "transformer", ("kind", "config", "model", "tokenizer", "split", "step",
                                                       *required))
    if checkpoint["kind"] != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a readable transformer checkpoint (it lacks the transformer fields)")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, device="cpu", attention: str | None = None) -> Transformer:
    """Rebuild the model a checkpoint describes and load its weights."""
    config = dict(checkpoint["config"])
    if attention is not None:
        config["attention"] = attention
    try:
        model = Transformer(TransformerConfig(**config))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint does not match this model: {str(error).splitlines()[0]}") from None
    return model.to(device)


# --quick: a learner-sized run (README, "Results": 4 min 6 s on a 2-core CPU). It is only a preset of the flags
# below; a flag given beside --quick wins over the preset, and --resume needs --quick again, like any other setting.
QUICK_PRESET = {"d_model": 128, "d_ff": 512, "vocab_size": 4000, "max_tokens": 1000, "train_fraction": 0.7, "epochs": 1,
                "warmup_steps": 200, "lr_factor": 0.5, "out_dir": "runs/transformer-quick"}


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with the defaults of the README's results table and the range each one accepts."""
    parser = argparse.ArgumentParser(description="Train an English->Spanish Transformer on Tatoeba.")
    quick = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK_PRESET.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"a learner-sized run of about 4 minutes on a 2-core CPU, the preset {quick}; "
                             "a flag given beside it wins over the preset")
    add_model_flags(parser)
    add_training_flags(parser)
    parser.add_argument("--threads", type=int_in_range(0, 1024), default=0,
                        help="torch CPU threads (0: OMP_NUM_THREADS if set, else one per core)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/transformer", help="checkpoints, metrics.jsonl and plots")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/last.pt (with the same flags; --epochs may grow)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model's flags. Their defaults are TransformerConfig's, so the model file and this script cannot disagree."""
    model = TransformerConfig()
    parser.add_argument("--vocab-size", type=int_in_range(100, 1_000_000), default=model.vocab_size,
                        help="shared SentencePiece BPE vocabulary size")
    parser.add_argument("--d-model", type=int_in_range(2, 8192), default=model.d_model, help="model width (even)")
    parser.add_argument("--num-heads", type=int_in_range(1, 256), default=model.num_heads,
                        help="attention heads (divide --d-model)")
    parser.add_argument("--encoder-layers", type=int_in_range(1, 64), default=model.num_encoder_layers,
                        help="encoder layers")
    parser.add_argument("--decoder-layers", type=int_in_range(1, 64), default=model.num_decoder_layers,
                        help="decoder layers")
    parser.add_argument("--d-ff", type=int_in_range(1, 65536), default=model.d_ff, help="feed-forward inner width")
    parser.add_argument("--dropout", type=probability, default=model.dropout,
                        help="dropout probability, in [0, 1): on the embeddings, the attention weights, inside the "
                             "feed-forward and on every sublayer's output")
    parser.add_argument("--pre-norm", action="store_true", help="LayerNorm before each sublayer (default: post-norm)")
    parser.add_argument(
        "--attention", choices=["handwritten", "fused"], default="handwritten",
        help="eq. 1 written out, or torch's fused scaled_dot_product_attention",
    )


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The data, the schedule, validation and the length of the run."""
    parser.add_argument("--epochs", type=positive_int, default=4,
                        help="number of passes over the training pairs (may grow on --resume)")
    parser.add_argument("--max-tokens", type=int_in_range(16, 1_000_000), default=1500,
                        help="padded tokens per batch, on each side (source and target)")
    parser.add_argument("--max-len", type=int_in_range(4, 256), default=64,
                        help="drop training pairs longer than this many tokens (the model reads at most 256)")
    parser.add_argument("--average-decay", type=probability, default=0.998,
                        help="decay of the moving average of the weights that validation and best.pt use, in [0, 1) "
                             "(0: off)")
    parser.add_argument("--label-smoothing", type=probability, default=0.1,
                        help="epsilon of label smoothing, in [0, 1) (0: off)")
    parser.add_argument("--schedule", choices=["noam", "constant"], default="noam", help="learning-rate schedule")
    parser.add_argument("--warmup-steps", type=positive_int, default=400,
                        help="warm-up steps w of the Noam schedule, eq. 9 (>= 1)")
    parser.add_argument("--lr-factor", type=positive_float, default=0.7,
                        help="multiplier c of the Noam schedule, eq. 9 (> 0)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of --schedule constant (> 0)")
    parser.add_argument("--train-fraction", type=positive_float, default=1.0,
                        help="use only this share of training pairs, in (0, 1]")
    parser.add_argument("--valid-pairs", type=non_negative_int, default=0,
                        help="validation pairs for the loss (0: all)")
    parser.add_argument("--valid-bleu-sentences", type=positive_int, default=500,
                        help="validation pairs decoded (greedy) for the BLEU of each validation")
    parser.add_argument("--valid-every", type=non_negative_int, default=0,
                        help="also validate every N steps (0: per epoch)")
    parser.add_argument("--max-steps", type=non_negative_int, default=0,
                        help="stop after this many steps in total (0: no cap)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the split, tokenizer and initialisation")


def parse_args(argv=None):
    """The command line, checked: each flag's own range, then the rules that tie two flags together."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the preset replaces the defaults, then the command line is read again over it
        parser.set_defaults(**QUICK_PRESET)
        args = parser.parse_args(argv)
    if args.d_model % args.num_heads or args.d_model % 2:
        raise RunError("--d-model must be even and divisible by --num-heads")
    if args.train_fraction > 1.0:
        raise RunError("--train-fraction must lie in (0, 1]")
    return args


def model_config(args, vocab_size: int) -> TransformerConfig:
    """The model's config from the command line."""
    return TransformerConfig(
        vocab_size=vocab_size, d_model=args.d_model, num_heads=args.num_heads,
        num_encoder_layers=args.encoder_layers, num_decoder_layers=args.decoder_layers, d_ff=args.d_ff,
        dropout=args.dropout, pad_id=PAD_ID, norm_first=args.pre_norm, attention=args.attention,
    )


@torch.no_grad()
def validate(model, encoded, processor, pairs, args, device) -> dict:
    """Validation loss (plain cross-entropy, no smoothing) over all pairs, greedy BLEU on the first few."""
    import sacrebleu

    model.eval()
    total_loss, total_tokens = 0.0, 0
    for indices in token_batches(encoded, args.max_tokens):
        source, decoder_input, decoder_target = collate(encoded, indices, device)
        logits = model(source, decoder_input)
        total_loss += F.cross_entropy(
            logits.flatten(0, 1), decoder_target.flatten(), ignore_index=PAD_ID, reduction="sum"
        ).item()
        total_tokens += int((decoder_target != PAD_ID).sum())
    subset = pairs[: args.valid_bleu_sentences]
    hypotheses = translate(model, processor, [source for source, _ in subset], beam_size=1, device=device)
    bleu = sacrebleu.corpus_bleu(hypotheses, [[target for _, target in subset]]).score
    model.train()
    return {"valid_loss": total_loss / max(total_tokens, 1), "valid_bleu": bleu}


def plot_curves(records: list[dict], path: Path):
    """Training/validation loss and validation BLEU against epoch."""
    epochs = [r["epoch"] for r in records]
    figure, (loss_axis, bleu_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_axis.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (label-smoothed)")
    loss_axis.plot(epochs, [r["valid_loss"] for r in records], "o-", label="valid (plain cross-entropy)")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss per token")
    loss_axis.legend()
    bleu_axis.plot(epochs, [r["valid_bleu"] for r in records], "o-", color="tab:green")
    bleu_axis.set_xlabel("epoch")
    bleu_axis.set_ylabel("valid BLEU (greedy, averaged weights)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_records(records: list[dict], path: Path):
    """Rewrite metrics.jsonl from the records a checkpoint holds (a resumed run continues exactly this log)."""
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


@dataclass
class Run:
    """One training run: its data, tokenizer, model and optimizer, and where it stands (what a checkpoint saves)."""

    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    tokenizer_bytes: bytes
    processor: object  # the SentencePiece processor of tokenizer_bytes
    train_encoded: list
    valid_pairs: list
    valid_encoded: list
    config: TransformerConfig = None
    model: Transformer = None
    optimizer: torch.optim.Optimizer = None
    average: WeightAverage | None = None
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_bleu: float = -1.0
    records: list = field(default_factory=list)
    # the training loss summed over the steps since the last validation: its mean is the record's train_loss
    window: dict = field(default_factory=lambda: {"loss": 0.0, "tokens": 0, "seconds": 0.0})
    elapsed_before: float = 0.0  # seconds of the sessions this one resumed
    saved_step: int | None = None  # the step last.pt holds
    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.time() - self.started, 1)

    def last_good(self) -> str:
        """Which checkpoint a run that diverged leaves as its last good state."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"{self.out_dir / 'last.pt'} (step {self.saved_step}) holds the last good state"


# ---- checkpoints: saving and restoring, side by side ----

def payload(run: Run) -> dict:
    """Everything --resume and eval.py need, as tensors, dicts, lists, numbers and strings only.

    "model" holds the weights eval.py translates with: the moving average when it is on ("raw_model" then
    keeps the training weights for --resume). The counters, the loss window and the random state are those
    of the same finished step as the weights.
    """
    weights = {"model": run.model.state_dict()}
    if run.average is not None:
        weights = {"model": run.average.weights, "raw_model": run.model.state_dict(),
                   "average_updates": run.average.updates}
    return {
        "kind": CHECKPOINT_KIND, "config": run.config.to_dict(), **weights,
        "optimizer": run.optimizer.state_dict(), "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
        "step": run.step, "best_bleu": run.best_bleu, "window": dict(run.window), "elapsed_seconds": run.elapsed(),
        "records": [json.dumps(r) for r in run.records], "rng_states": rng_states(),
        "tokenizer": torch.tensor(list(run.tokenizer_bytes), dtype=torch.uint8),
        "split": {"seed": run.args.seed, "valid_fraction": 0.03, "test_fraction": 0.03},
        "train_args": json.dumps(vars(run.args)), "threads": torch.get_num_threads(),
    }


def restore(run: Run, checkpoint: dict) -> None:
    """Put a run back where last.pt left it; metrics.jsonl is cut back to the records of that step."""
    last_path = run.out_dir / "last.pt"
    if checkpoint["config"] != run.config.to_dict():
        raise RunError(f"{last_path} was trained with another config; use the same flags or another --out-dir")
    if run.average is not None:
        run.average.weights = {name: tensor.to(run.device) for name, tensor in checkpoint["model"].items()}
        run.average.updates = checkpoint["average_updates"]
    run.model.load_state_dict(checkpoint.get("raw_model", checkpoint["model"]))
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.epoch, run.batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
    run.step, run.best_bleu = checkpoint["step"], checkpoint["best_bleu"]
    run.records = [json.loads(line) for line in checkpoint["records"]]
    run.window.update(checkpoint.get("window", {}))
    run.elapsed_before = checkpoint.get("elapsed_seconds",
                                        run.records[-1]["elapsed_seconds"] if run.records else 0.0)
    run.saved_step = run.step
    restore_rng_states(checkpoint.get("rng_states") or {"cpu": checkpoint["rng_state"]})
    write_records(run.records, run.out_dir / "metrics.jsonl")  # drops any line logged after this checkpoint
    warn_if_threads_changed(checkpoint.get("threads"))
    print(f"resumed from {last_path} after epoch {run.epoch}, step {run.step}")


# ---- set-up, the loop, finish ----

def prepare_data(args, checkpoint: dict | None) -> dict:
    """The split, the tokenizer (trained here, or the saved run's) and the encoded training and validation pairs."""
    splits = split_pairs(load_pairs(), args.seed)
    train_pairs = splits["train"]
    if args.train_fraction < 1.0:
        keep = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(args.seed))
        train_pairs = [train_pairs[i] for i in keep[: int(len(train_pairs) * args.train_fraction)].tolist()]
    if not train_pairs:
        raise RunError(f"--train-fraction {args.train_fraction} keeps no training pair")
    if checkpoint is not None:
        tokenizer_bytes = bytes(checkpoint["tokenizer"].tolist())
    else:
        tokenizer_bytes = train_tokenizer(train_pairs, args.vocab_size, args.seed)
    processor = load_tokenizer(tokenizer_bytes)
    train_encoded = encode_pairs(processor, train_pairs, args.max_len)
    if not train_encoded:
        raise RunError("no training pair is left: raise --train-fraction or --max-len")
    valid_pairs = splits["valid"][: args.valid_pairs] if args.valid_pairs else splits["valid"]
    print(f"pairs: train {len(splits['train'])}, valid {len(splits['valid'])}, test {len(splits['test'])} "
          f"(split by English sentence); training on {len(train_encoded)}")
    return {"tokenizer_bytes": tokenizer_bytes, "processor": processor, "train_encoded": train_encoded,
            "valid_pairs": valid_pairs, "valid_encoded": encode_pairs(processor, valid_pairs, 256)}


def set_up(args) -> Run:
    """Check the run folder, prepare the data, build the model and optimizer; on --resume, restore last.pt."""
    device = pick_device(args.device)
    out_dir = Path(args.out_dir)
    check_run_folder(out_dir, args.resume, args.overwrite)
    if args.overwrite:
        remove_run_files(out_dir, RUN_FILES)
    checkpoint = load_run_checkpoint(out_dir / "last.pt", RESUME_KEYS) if args.resume else None
    if checkpoint is not None:
        refuse_changed_settings(json.loads(checkpoint["train_args"]), vars(args), FIXED_ON_RESUME)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args, device, out_dir, **prepare_data(args, checkpoint))
    torch.manual_seed(args.seed)
    run.config = model_config(args, run.processor.get_piece_size())
    run.model = Transformer(run.config).to(device)
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    run.average = WeightAverage(run.model, args.average_decay) if args.average_decay else None
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")  # a fresh run starts a fresh log
    print(f"model: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, {run.config}")
    run.started = time.time()
    return run


def evaluate_and_save(run: Run, batches_in_epoch: int) -> None:
    """Validate, log a record, write best/last checkpoints and the curves; nothing at all if a loss diverged."""
    record = {"epoch": round(run.epoch + run.batch_in_epoch / batches_in_epoch, 3), "step": run.step,
              "train_loss": run.window["loss"] / max(run.window["tokens"], 1),
              "train_target_tokens_per_s": run.window["tokens"] / max(run.window["seconds"], 1e-9)}
    raw = run.average.swapped_into(run.model) if run.average is not None else None
    try:
        record.update(validate(run.model, run.valid_encoded, run.processor, run.valid_pairs, run.args, run.device))
    finally:
        if raw is not None:
            run.model.load_state_dict(raw)
    if not math.isfinite(record["valid_loss"]):
        raise RunError(f"the validation loss is not finite at step {run.step}; stopped without saving: "
                       f"{run.last_good()}")
    record["elapsed_seconds"] = run.elapsed()  # resumed runs add up
    run.records.append(record)
    run.window.update(loss=0.0, tokens=0, seconds=0.0)
    tqdm.write(json.dumps(record))
    with open(run.out_dir / "metrics.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    if record["valid_bleu"] > run.best_bleu:
        run.best_bleu = record["valid_bleu"]
        save_checkpoint(run.out_dir / "best.pt", payload(run))
    save_checkpoint(run.out_dir / "last.pt", payload(run))
    run.saved_step = run.step
    plot_curves(run.records, run.out_dir / "curves.png")


def training_step(run: Run, batch: list) -> float:
    """One optimizer step on one batch of pair indices (and the weight average's update); returns the loss."""
    step_start = time.time()
    source, decoder_input, decoder_target = collate(run.train_encoded, batch, run.device)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.step + 1, run.args)
    logits = run.model(source, decoder_input)  # (B, Tt, vocab)
    loss = label_smoothed_cross_entropy(logits.flatten(0, 1), decoder_target.flatten(), run.args.label_smoothing)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise RunError(f"the training loss is not finite at step {run.step + 1}; stopped without saving: "
                       f"{run.last_good()}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.average is not None:
        run.average.update(run.model)
    tokens = int((decoder_target != PAD_ID).sum())
    run.window["loss"] += loss_value * tokens
    run.window["tokens"] += tokens
    run.window["seconds"] += time.time() - step_start
    return loss_value


def train_epoch(run: Run, stop: StopFlag) -> bool:
    """The batches of the epoch in progress not yet done, validating when due; True when Ctrl-C stopped it."""
    args = run.args
    # the batch order of epoch e depends only on (seed, e), so --resume replays it exactly
    batches = token_batches(run.train_encoded, args.max_tokens, torch.Generator().manual_seed(args.seed + run.epoch))
    progress = tqdm(total=len(batches), initial=run.batch_in_epoch, desc=f"epoch {run.epoch + 1}/{args.epochs}",
                    disable=args.no_progress)
    try:
        while True:
            loss_value = training_step(run, batches[run.batch_in_epoch])
            run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + 1  # together: the step is done
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{learning_rate(run.step, args):.2e}")
            if run.batch_in_epoch == len(batches):
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
            at_end = run.batch_in_epoch == 0 or (args.max_steps and run.step >= args.max_steps)
            if at_end or (args.valid_every and run.step % args.valid_every == 0):
                evaluate_and_save(run, len(batches))
            # a step boundary: this step is complete and nothing random of the next one is drawn yet
            if stop.requested:
                return True
            if at_end:
                return False
    finally:
        progress.close()


def train_epochs(run: Run) -> bool:
    """The loop: epochs until --epochs (or --max-steps); False when Ctrl-C stopped it (last.pt saved)."""
    args = run.args
    run.model.train()
    stop = StopFlag()
    try:
        while run.epoch < args.epochs and not (args.max_steps and run.step >= args.max_steps):
            if train_epoch(run, stop):
                if run.saved_step != run.step:
                    save_checkpoint(run.out_dir / "last.pt", payload(run))
                print(f"stopped at step {run.step}; resume with: python transformer/train.py --out-dir "
                      f"{run.out_dir} --resume")
                return False
    finally:
        stop.close()
    return True


def train(args) -> int:
    """The whole run: set-up (and restore), the loop; 0 when it finished, EXIT_INTERRUPTED after a Ctrl-C."""
    run = set_up(args)
    if not train_epochs(run):
        return EXIT_INTERRUPTED
    minutes = (time.time() - run.started) / 60
    print(f"done in {minutes:.1f} min this session; best valid BLEU {run.best_bleu:.2f}; checkpoints in "
          f"{run.out_dir}")
    return 0


def main(argv=None):
    """Run, turning errors a user can cause into one line on stderr; a run stopped by Ctrl-C exits with 130."""
    try:
        status = train(parse_args(argv))
    except (RunError, DataError, ValueError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted before the end of a step: nothing was saved since the last checkpoint")
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
