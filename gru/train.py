"""Train the BiGRU tagger on MSRA NER: length-bucketed batches, validation entity F1 each epoch, best/last checkpoints.

    python gru/train.py                       # the README's default run
    python gru/train.py --quick               # the same model in about 5 minutes -> runs/gru-quick
    python gru/train.py --output softmax      # the same without the CRF
    python gru/train.py --impl torch          # torch.nn.GRU instead of the hand-written GRU
    python gru/train.py --backward autograd   # the hand-written GRU, differentiated by autograd

Ctrl-C stops at the end of the current step and saves last.pt; --resume continues exactly where it stopped.
A folder that holds a run needs --resume, a new --out-dir, or --overwrite.
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
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data import DataError  # noqa: E402
from gru.corpus import TAGS, build_vocab, collate, load_msra, make_batches  # noqa: E402
from gru.model import Tagger, TaggerConfig  # noqa: E402
from gru.runs import (  # noqa: E402
    EXIT_INTERRUPTED,
    RunError,
    StopFlag,
    check_run_folder,
    int_in_range,
    load_checkpoint,
    non_negative_float,
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
    warn_if_threads_changed,
    write_text_atomically,
)
from gru.tagging import entity_scores, predict  # noqa: E402

MODEL_KEYS = ("embedding_dim", "hidden_size", "num_layers", "dropout", "output", "impl", "backward")
# Arguments that change the run and so must match when resuming (the rest, e.g. --device or --stop-after, may change).
FIXED_ON_RESUME = ("quick", "seed", "validation_size", "max_length", "min_count", "limit_train", "batch_size", "lr",
                   "epochs", "clip", *MODEL_KEYS)
# What --resume reads from last.pt besides the model's own fields.
RESUME_KEYS = ("model", "optimizer", "config", "vocab", "tags", "args", "epoch", "batch_in_epoch", "step", "best_f1",
               "history", "batch_rng", "rng_states", "epoch_progress")
# The files a training run (and eval.py's confusion picture) writes into its --out-dir; --overwrite removes these.
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "curves.png",
             "confusion.png")
# --quick: the default model on a shorter schedule, a whole run (data, training, validation, and eval.py's test pass)
# in about 5 minutes on a 2-core CPU. These are only new defaults: a flag given beside --quick wins.
QUICK_PRESET = {"epochs": 2, "out_dir": "runs/gru-quick"}
SIZE = int_in_range(1, 4096)  # embedding and state sizes: beyond this the weights alone outgrow a laptop's memory


def build_parser() -> argparse.ArgumentParser:
    """The command line; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK_PRESET.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"a run of about 5 minutes on 2 CPU cores: the defaults become {preset}; a flag given "
                             f"beside --quick wins")
    parser.add_argument("--epochs", type=positive_int, default=10, help="passes over the training sentences")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sentences per batch")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak Adam learning rate (cosine decay to 5%%)")
    parser.add_argument("--clip", "--grad-clip", dest="clip", type=non_negative_float, default=5.0,
                        help="clip the gradient's global L2 norm to this (0: no clipping)")
    parser.add_argument("--embedding-dim", type=SIZE, default=128, help="size of a character embedding")
    parser.add_argument("--hidden-size", type=SIZE, default=128, help="GRU state size per direction")
    parser.add_argument("--num-layers", type=int_in_range(1, 16), default=1, help="stacked BiGRU layers")
    parser.add_argument("--dropout", type=probability, default=0.2, help="dropout on embeddings and GRU outputs")
    parser.add_argument("--output", choices=["crf", "softmax"], default="crf", help="output layer")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten", help="which GRU")
    parser.add_argument("--backward", choices=["handwritten", "autograd"], default="handwritten",
                        help="the hand-written GRU's backward: written out (GRULayerFunction) or autograd through "
                             "the same forward (ignored by --impl torch)")
    parser.add_argument("--min-count", type=positive_int, default=2, help="rarer characters become <unk>")
    parser.add_argument("--validation-size", type=positive_int, default=2500, help="sentences held out of train")
    parser.add_argument("--max-length", type=positive_int, default=100, help="longer sentences are cut at punctuation")
    parser.add_argument("--limit-train", type=non_negative_int, default=0,
                        help="use only this many training sentences (0: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed (init, split, batch order, dropout)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/gru", help="checkpoints, metrics.jsonl and curves go here")
    parser.add_argument("--stop-after", type=non_negative_int, default=0,
                        help="end after this many epochs, keeping the schedule of --epochs (continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (argparse refuses an out-of-range value with its usage and exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # parse again with the preset as defaults, so that the flags given explicitly still win
        parser.set_defaults(**QUICK_PRESET)
        args = parser.parse_args(argv)
    return args


def resume_command(args) -> str:
    """The command that continues this run: --quick and every setting that differs from the defaults, and --resume."""
    defaults = parse_args(["--quick"] if args.quick else [])
    parts = ["python gru/train.py", f"--out-dir {args.out_dir}", "--resume"] + (["--quick"] if args.quick else [])
    for name in FIXED_ON_RESUME:
        value = getattr(args, name)
        if name != "quick" and value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation entity F1 per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    left.plot(epochs, [row["validation_loss"] for row in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss per character (nats)", title="loss")
    left.legend()
    right.plot(epochs, [row["validation_f1"] for row in history], "o-", color="C2")
    right.set(xlabel="epoch", ylabel="entity F1 (strict)", title="validation entity F1")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


@torch.no_grad()
def mean_loss(model, sentences, char_to_id, tag_to_id, device, batch_size=256) -> float:
    """Loss per character over a set of sentences, without dropout."""
    model.eval()
    total, characters = 0.0, 0
    for indices in make_batches(sentences, batch_size):
        char_ids, tag_ids, lengths = collate(sentences, indices, char_to_id, tag_to_id, device)
        total += model.loss(char_ids, tag_ids, lengths).item() * int(lengths.sum())
        characters += int(lengths.sum())
    return total / characters


@dataclass
class Run:
    """One training run: its data, model and optimizer, and where it stands (what last.pt saves)."""

    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    train_set: list
    validation_set: list
    vocab: list
    config: TaggerConfig
    model: Tagger
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # batch order; its state at an epoch's start is saved
    # where training stands: finished epochs, batches done of the next one, steps done, that epoch's running sums
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    history: list = field(default_factory=list)
    progress: dict = field(default_factory=lambda: {"loss_sum": 0.0, "characters": 0, "seconds": 0.0})
    saved_step: int | None = None  # the step last.pt holds

    @property
    def char_to_id(self) -> dict:
        return {char: i for i, char in enumerate(self.vocab)}

    @property
    def tag_to_id(self) -> dict:
        return {tag: i for i, tag in enumerate(TAGS)}


# ---- checkpoints: saving and restoring, side by side ----

def snapshot(run: Run, epoch_start_rng: torch.Tensor) -> dict:
    """Everything --resume needs, only tensors, dicts, lists, numbers and strings.

    batch_rng is the batch-order generator at the start of the epoch in progress, so that --resume draws the
    same batches again and skips the `batch_in_epoch` already trained; rng_states are the generators after the
    last finished step (dropout).
    """
    return {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "config": run.config.to_dict(),
        "vocab": run.vocab, "tags": TAGS, "args": vars(run.args), "epoch": run.epoch,
        "batch_in_epoch": run.batch_in_epoch, "step": run.step, "best_f1": run.best_f1, "history": run.history,
        "batch_rng": epoch_start_rng, "rng_states": rng_states(), "epoch_progress": dict(run.progress),
        "threads": torch.get_num_threads(),
    }


def restore(run: Run, checkpoint: dict) -> None:
    """Put a run back where last.pt left it (loaded on the CPU: the weights are copied onto the model's device)."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
    run.epoch, run.batch_in_epoch, run.step = checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]
    run.best_f1, run.history, run.progress = checkpoint["best_f1"], checkpoint["history"], checkpoint["epoch_progress"]
    run.generator.set_state(checkpoint["batch_rng"])
    restore_rng_states(checkpoint["rng_states"])
    run.saved_step = run.step
    warn_if_threads_changed(checkpoint.get("threads"))
    tqdm.write(f"resumed from {run.out_dir / 'last.pt'} at step {run.step}: epoch {run.epoch} done, "
               f"{run.batch_in_epoch} batches of the next")


def save_last(run: Run, epoch_start_rng: torch.Tensor) -> None:
    save_checkpoint(run.out_dir / "last.pt", snapshot(run, epoch_start_rng))
    run.saved_step = run.step


def write_metrics(history: list[dict], path: Path) -> None:
    """metrics.jsonl, one row per finished epoch, replaced atomically."""
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in history))


# ---- set-up, the loop, finish ----

def set_up(args) -> Run:
    """Check the run folder, read the data, build the model and optimizer; on --resume, restore last.pt."""
    out_dir = Path(args.out_dir)
    check_run_folder(out_dir, args.resume, args.overwrite)
    if args.overwrite:
        remove_run_files(out_dir, RUN_FILES)
    device = pick_device(args.device)
    checkpoint = load_checkpoint(out_dir / "last.pt", "gru", RESUME_KEYS) if args.resume else None
    if checkpoint is not None:
        refuse_changed_settings(checkpoint["args"], vars(args), FIXED_ON_RESUME)
    torch.manual_seed(args.seed)
    train_set, validation_set = load_msra(args.validation_size, args.max_length, args.seed, log=tqdm.write)
    if args.limit_train:
        train_set = train_set[: args.limit_train]
    vocab = checkpoint["vocab"] if checkpoint is not None else build_vocab(train_set, args.min_count)
    config = TaggerConfig(len(vocab), len(TAGS), **{k: getattr(args, k) for k in MODEL_KEYS})
    model = Tagger(config).to(device)
    run = Run(args, device, out_dir, train_set, validation_set, vocab, config, model,
              torch.optim.Adam(model.parameters(), lr=args.lr), torch.Generator().manual_seed(args.seed))
    if checkpoint is not None:
        restore(run, checkpoint)
    tqdm.write(f"{len(train_set)} train / {len(validation_set)} validation sentences, vocabulary {len(vocab)}, "
               f"{sum(p.numel() for p in run.model.parameters()):,} parameters, {args.impl} GRU, {args.output}, "
               f"{device}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return run


def learning_rate(run: Run) -> float:
    """Cosine decay from --lr to 5% of it over the whole run."""
    total_steps = math.ceil(len(run.train_set) / run.args.batch_size) * run.args.epochs
    return run.args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(run.step / total_steps, 1.0))))


def stop_if_not_finite(run: Run, value: float, what: str) -> None:
    """A diverged run stops before it writes anything: the weights in memory may already be ruined."""
    if not math.isfinite(value):
        kept = ("no checkpoint was written yet" if run.saved_step is None
                else f"last.pt (step {run.saved_step}) holds the last good state")
        raise RunError(f"the {what} is not finite at step {run.step + (what == 'training loss')}; "
                       f"stopped without saving: {kept}")


def train_epoch(run: Run, stop: StopFlag) -> bool:
    """The batches of the epoch in progress not yet done; True when Ctrl-C stopped it mid-epoch (last.pt saved)."""
    args, model, optimizer = run.args, run.model, run.optimizer
    epoch_start_rng = run.generator.get_state()  # what --resume needs to draw this epoch's batches again
    batches = make_batches(run.train_set, args.batch_size, run.generator)
    char_to_id, tag_to_id = run.char_to_id, run.tag_to_id
    model.train()
    started = time.time()
    with tqdm(total=len(batches), initial=run.batch_in_epoch, desc=f"epoch {run.epoch + 1}/{args.epochs}",
              leave=False, mininterval=2) as bar:
        for indices in batches[run.batch_in_epoch:]:
            char_ids, tag_ids, lengths = collate(run.train_set, indices, char_to_id, tag_to_id, run.device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run)
            loss = model.loss(char_ids, tag_ids, lengths)
            loss_value = loss.item()
            stop_if_not_finite(run, loss_value, "training loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            # the step is done: counters and sums move with the weights, so a save here is consistent
            run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + 1
            run.progress["loss_sum"] += loss_value * int(lengths.sum())
            run.progress["characters"] += int(lengths.sum())
            bar.update()
            bar.set_postfix(loss=f"{run.progress['loss_sum'] / run.progress['characters']:.4f}", refresh=False)
            if stop.requested and run.batch_in_epoch < len(batches):  # the last step goes on to validation
                run.progress["seconds"] += time.time() - started
                save_last(run, epoch_start_rng)
                return True
    run.progress["seconds"] += time.time() - started
    return False


def validate_and_save(run: Run) -> dict:
    """Score the finished epoch on validation, then write its record, best.pt (if it improved), last.pt, curves."""
    model, validation_set = run.model, run.validation_set
    gold = [tags for _, tags in validation_set]
    scores = entity_scores(gold, predict(model, validation_set, run.char_to_id, TAGS, run.device))
    validation_loss = mean_loss(model, validation_set, run.char_to_id, run.tag_to_id, run.device)
    stop_if_not_finite(run, validation_loss, "validation loss")
    train_seconds = max(run.progress["seconds"], 1e-9)
    row = {"epoch": run.epoch + 1, "train_loss": run.progress["loss_sum"] / run.progress["characters"],
           "validation_loss": validation_loss, "validation_f1": scores["f1"],
           "validation_precision": scores["precision"], "validation_recall": scores["recall"],
           "train_seconds": round(train_seconds, 1),
           "chars_per_second": round(run.progress["characters"] / train_seconds)}
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    run.progress = {"loss_sum": 0.0, "characters": 0, "seconds": 0.0}
    run.history.append(row)
    if row["validation_f1"] > run.best_f1:
        run.best_f1 = row["validation_f1"]
        save_checkpoint(run.out_dir / "best.pt", snapshot(run, run.generator.get_state()))
    save_last(run, run.generator.get_state())  # the next epoch starts from this generator state
    write_metrics(run.history, run.out_dir / "metrics.jsonl")
    tqdm.write(f"epoch {run.epoch}: train loss {row['train_loss']:.4f}, validation loss "
               f"{row['validation_loss']:.4f}, entity F1 {row['validation_f1']:.4f} "
               f"({row['train_seconds']:.0f} s, {row['chars_per_second']} chars/s)")
    plot_curves(run.history, run.out_dir / "curves.png")
    return row


def train_epochs(run: Run) -> str:
    """The loop: epochs of training and validation. "finished", "stopped" (Ctrl-C) or "paused" (--stop-after)."""
    stop = StopFlag()
    try:
        while run.epoch < run.args.epochs:
            # validation (a Ctrl-C in there lets it finish; the epoch's record and checkpoints are written first)
            if train_epoch(run, stop):
                return "stopped"
            validate_and_save(run)
            if stop.requested and run.epoch < run.args.epochs:
                return "stopped"
            if run.epoch == run.args.stop_after and run.epoch < run.args.epochs:
                return "paused"
    finally:
        stop.close()
    return "finished"


def train(args) -> int:
    """Set up (and restore), train, finish; the exit status: 0, or EXIT_INTERRUPTED after a Ctrl-C."""
    run = set_up(args)
    status = train_epochs(run)
    if status == "stopped":
        tqdm.write(f"stopped at step {run.step}; resume with: {resume_command(args)}")
        return EXIT_INTERRUPTED
    if status == "paused":
        tqdm.write(f"stopped after epoch {run.epoch} as asked; continue with --resume")
        return 0
    best_path = run.out_dir / "best.pt"
    tqdm.write(f"best validation entity F1 {run.best_f1:.4f}; checkpoints in {run.out_dir}")
    tqdm.write(f"score it on the test set with: python gru/eval.py --checkpoint {best_path}")
    return 0


def main(argv=None) -> int:
    """Run train() and turn user errors into one line on stderr; a run stopped by Ctrl-C exits with 130."""
    args = parse_args(argv)
    try:
        return train(args)
    except (RunError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
