"""Train the chapter's models: a character language model on Jane Austen (default), or the adding problem.

    python lstm/train.py                                        # hand-written LSTM language model
    python lstm/train.py --quick                                # the same model in about 5 minutes -> runs/lstm-quick
    python lstm/train.py --impl torch --out-dir runs/lstm-torch # the same with torch.nn.LSTM
    python lstm/train.py --cell rnn --out-dir runs/lstm-rnn     # the tanh RNN baseline, same parameter count
    python lstm/train.py --task adding --out-dir runs/lstm-adding
    python lstm/train.py --out-dir runs/lstm --resume              # continue a stopped run (Ctrl-C stops it)
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataError  # noqa: E402
from lstm.model import (  # noqa: E402
    AddingConfig,
    AddingModel,
    CharConfig,
    CharLanguageModel,
    detach_state,
    matching_rnn_hidden_size,
    recurrent_parameter_count,
)
from lstm.runs import (  # noqa: E402
    EXIT_INTERRUPTED,
    RunError,
    StopFlag,
    check_run_folder,
    finite_float,
    load_checkpoint,
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
from lstm.tasks import DEFAULT_BOOKS, adding_batch, into_streams, load_corpus  # noqa: E402

TRIVIAL_ADDING_MSE = 1 / 6  # always answering 1.0: the variance of a sum of two uniform values
# Each model's peak learning rate from the README's sweep: the RNN is best at 3e-3 and diverges at 2e-2; the LSTM is
# as good at 1e-2 as at 2e-2 (within run-to-run noise) and unstable at 3e-2.
DEFAULT_LEARNING_RATES = {"lstm": 1e-2, "rnn": 3e-3}
# --quick: the default model on a shorter schedule, a whole run (data, training, test pass) in about 5 minutes on a
# 2-core CPU. Windows of 50 characters halve the time of a step, so the run takes 1000 steps. These are only new
# defaults: a flag given beside --quick wins.
QUICK_PRESET = {"steps": 1000, "seq_len": 50, "eval_every": 200, "out_dir": "runs/lstm-quick"}
# Arguments that must match when resuming: they change the model, the data, its order or the schedule. The rest
# (--device, --backward, --lengths and --cells of the adding problem) may change.
FIXED_ON_RESUME = ("quick", "task", "impl", "cell", "books", "hidden_size", "num_layers", "embedding_size",
                   "dropout", "seq_len", "batch_size", "steps", "lr", "grad_clip", "eval_every", "adding_steps",
                   "adding_hidden_size", "adding_batch_size", "adding_lr", "adding_forget_bias", "seed")
MAX_PARAMETERS = 2**31  # a model beyond this (8 GiB of float32 weights) is beyond this chapter's scripts
MAX_BATCH_ELEMENTS = 2**28  # one adding-problem batch (batch x length x 2 floats) is kept below 1 GiB
# The checkpoints that mean a folder holds a run. The adding problem keeps one pair per model and length:
# adding-lstm-100-last.pt, adding-lstm-100-best.pt, ...
CHECKPOINT_PATTERNS = ("last.pt", "best.pt", "adding-*-last.pt", "adding-*-best.pt")
# The files a training run writes into its --out-dir (--overwrite removes exactly these, and nothing else there).
RUN_FILES = (*CHECKPOINT_PATTERNS, *(pattern + ".tmp" for pattern in CHECKPOINT_PATTERNS), "metrics.jsonl",
             "metrics.jsonl.tmp", "summary.json", "curves.png", "adding.png")


class StopRequested(Exception):
    """Ctrl-C was pressed: the state at a step boundary is saved, and the run ends with this message, exit code 130."""


def fail(message: str):
    """End the program with one line on stderr, `error: <message>`, and exit code 1 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    """The command line; the defaults reproduce the README's results table. Every number states its range."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["lm", "adding"], default="lm", help="language model, or the adding problem")
    preset = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK_PRESET.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"language model in about 5 minutes on 2 CPU cores: the defaults become {preset}; "
                             f"a flag given beside --quick wins")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten",
                        help="the LSTM written in model.py, or torch.nn.LSTM")
    parser.add_argument("--backward", choices=["handwritten", "autograd"], default="handwritten",
                        help="--impl handwritten: each layer's backward written out (LSTMLayerFunction), or autograd "
                             "through the same forward code")
    parser.add_argument("--cell", choices=["lstm", "rnn"], default="lstm",
                        help="lm task: the LSTM, or the tanh RNN baseline sized to the LSTM's parameter count")
    parser.add_argument("--books", nargs="+", default=list(DEFAULT_BOOKS), help="Gutenberg files to train on")
    parser.add_argument("--hidden-size", type=positive_int, default=256, help="LSTM hidden size (the RNN's is matched)")
    parser.add_argument("--num-layers", type=positive_int, default=2, help="stacked recurrent layers")
    parser.add_argument("--embedding-size", type=positive_int, default=64, help="character embedding size")
    parser.add_argument("--dropout", type=probability, default=0.1,
                        help="dropout between layers and before the read-out, in [0, 1)")
    parser.add_argument("--seq-len", type=positive_int, default=100, help="characters per truncated-BPTT window")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="parallel text streams per step")
    parser.add_argument("--steps", type=positive_int, default=1300, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak Adam learning rate, cosine decay to 10%% (default: 1e-2 for the LSTM, 3e-3 for the "
                             "RNN, from the README's sweep)")
    parser.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this (> 0)")
    parser.add_argument("--eval-every", type=positive_int, default=100, help="steps between validation passes")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[50, 100, 200],
                        help="adding: sequence lengths (at least 2)")
    parser.add_argument("--cells", nargs="+", choices=["lstm", "rnn"], default=["lstm", "rnn"],
                        help="adding: models to compare")
    parser.add_argument("--adding-steps", type=positive_int, default=1500, help="adding: optimizer steps per run")
    parser.add_argument("--adding-hidden-size", type=positive_int, default=64, help="adding: LSTM hidden size")
    parser.add_argument("--adding-batch-size", type=positive_int, default=64, help="adding: sequences per step")
    parser.add_argument("--adding-lr", type=positive_float, default=1e-2, help="adding: Adam learning rate")
    parser.add_argument("--adding-forget-bias", type=finite_float, default=0.0,
                        help="adding: the LSTM's starting forget-gate bias (0: gates start at sigma(0) = 0.5)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed, in [0, 2**32)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/lstm", help="checkpoints, metrics.jsonl and plots go here")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    return parser


def parse_args(argv=None):
    """Parse and complete the arguments: --quick's defaults, each cell's own default learning rate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # parse again with the preset as defaults, so that the flags given explicitly still win
        if args.task != "lm":
            parser.error("--quick is a preset for the language model (--task lm)")
        parser.set_defaults(**QUICK_PRESET)
        args = parser.parse_args(argv)
    if any(length < 2 for length in args.lengths):
        parser.error("--lengths must be at least 2")
    if args.lr is None:
        args.lr = DEFAULT_LEARNING_RATES[args.cell]
    return args


def fixed_arguments(args) -> dict:
    """The FIXED_ON_RESUME arguments of this run, as saved in every checkpoint."""
    return {name: getattr(args, name) for name in FIXED_ON_RESUME}


def check_resumable(checkpoint: dict, path: Path, args, config: dict):
    """Refuse, in one line, to resume with a changed FIXED_ON_RESUME argument or another model."""
    refuse_changed_settings(checkpoint.get("train_arguments", {}), fixed_arguments(args), FIXED_ON_RESUME)
    if checkpoint["config"] != config:
        raise RunError(f"{path} was trained with another config; use a new --out-dir")


def resume_command(args) -> str:
    """The command that continues this run: the same settings, plus --resume."""
    defaults = parse_args(["--quick"] if args.quick else [])
    parts = ["python lstm/train.py", f"--out-dir {args.out_dir}", "--resume"] + (["--quick"] if args.quick else [])
    for name in FIXED_ON_RESUME:
        value = getattr(args, name)
        if name == "quick" or name == "lr" and value == DEFAULT_LEARNING_RATES[args.cell]:
            continue
        if name == "books":
            if list(value) != list(DEFAULT_BOOKS):
                parts.append("--books " + " ".join(value))
        elif value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def stop_if_not_finite(value: float, what: str, step: int, checkpoint_name: str, saved_step) -> None:
    """A diverged run ends before it writes anything, naming the checkpoint that holds the last good state."""
    if not math.isfinite(value):
        good = ("no checkpoint was written yet" if saved_step is None
                else f"{checkpoint_name} (step {saved_step}) holds the last good state")
        raise RunError(f"the {what} loss is not finite at step {step}; stopped without saving: {good}")


def write_lines_atomically(path: Path, lines: list[str]):
    """Replace a text file by `lines` (temporary file, fsync, rename)."""
    write_text_atomically(path, "".join(line + "\n" for line in lines))


def check_model_size(parameters: int):
    """Refuse a model too large for this chapter's scripts before allocating it."""
    if parameters > MAX_PARAMETERS:
        raise RunError(f"the model would have {parameters:,} parameters, more than this script builds "
                       f"({MAX_PARAMETERS:,}); choose smaller sizes")


def cosine_learning_rate(step: int, total_steps: int, peak: float) -> float:
    """Short linear warm-up, then cosine decay from peak to a tenth of it."""
    warmup = max(1, total_steps // 50)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_bpc(model, ids: torch.Tensor, batch_size: int = 32, seq_len: int = 200) -> float:
    """Bits per character over a whole text, read as batch_size streams with the state carried along each one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    streams = into_streams(ids, batch_size).to(device)  # (B, N // B)
    state, total_nats, count = None, 0.0, 0
    for start in range(0, streams.shape[1] - 1, seq_len):
        targets = streams[:, start + 1 : start + seq_len + 1]  # (B, T)
        inputs = streams[:, start : start + targets.shape[1]]  # (B, T)
        logits, state = model(inputs, state)  # (B, T, V)
        total_nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total_nats / count / math.log(2)


def language_model_config(args, vocab_size: int) -> CharConfig:
    """The LM config; the RNN baseline's hidden size is chosen so that its parameter count matches the LSTM's."""
    hidden_size = args.hidden_size
    if args.cell == "rnn":
        # The read-out adds vocab_size + 0 weights per hidden unit on top of the recurrent core.
        hidden_size = matching_rnn_hidden_size(args.hidden_size, args.embedding_size, args.num_layers, vocab_size)
    impl = "torch" if args.cell == "rnn" else args.impl
    return CharConfig(vocab_size, args.embedding_size, hidden_size, args.num_layers, args.dropout, args.cell, impl)


def plot_language_model(history: dict, path: Path, title: str):
    """Training and validation bits per character against steps."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(history["train_steps"], history["train_bpc"], alpha=0.5, label="train (per step)")
    axes.plot(history["validation_steps"], history["validation_bpc"], marker="o", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("bits per character")
    axes.set_title(title)
    axes.set_ylim(top=min(5.0, max(history["train_bpc"] + [2.0])))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- the language model ----

@dataclass
class LanguageModelRun:
    """One language-model run: its text, model and optimizer, and where it stands (what a checkpoint saves)."""

    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    train_streams: torch.Tensor  # (B, N): the training text cut into --batch-size contiguous streams
    validation_ids: torch.Tensor
    test_ids: torch.Tensor
    windows_per_epoch: int
    config: CharConfig
    model: CharLanguageModel
    optimizer: torch.optim.Optimizer
    run: dict  # what every checkpoint repeats: config, books, vocabulary
    history: dict = field(default_factory=lambda: {"train_steps": [], "train_bpc": [], "validation_steps": [],
                                                   "validation_bpc": []})
    start_step: int = 0
    best_bpc: float = float("inf")
    state: tuple | None = None  # the recurrent state carried from window to window
    elapsed: float = 0.0  # seconds of training, this session and the ones it resumed
    saved_step: int | None = None  # the step last.pt holds


def checkpoint_payload(lm: LanguageModelRun, step: int) -> dict:
    """Everything needed to evaluate the model or to resume training from `step`."""
    carried = [part.cpu() for part in lm.state] if isinstance(lm.state, tuple) else lm.state
    return {**lm.run, "model": lm.model.state_dict(), "optimizer": lm.optimizer.state_dict(), "step": step,
            "best_bpc": lm.best_bpc, "history": lm.history, "carried_state": carried, "rng_states": rng_states(),
            "elapsed_seconds": lm.elapsed, "train_arguments": fixed_arguments(lm.args),
            "threads": torch.get_num_threads()}


def restore_language_model(lm: LanguageModelRun, checkpoint: dict) -> None:
    """Put a run back where last.pt left it; metrics.jsonl keeps the records up to that step."""
    path = lm.out_dir / "last.pt"
    check_resumable(checkpoint, path, lm.args, lm.run["config"])
    if checkpoint.get("books") != lm.run["books"]:
        raise RunError(f"{path} was trained on other books; use a new --out-dir")
    lm.model.load_state_dict(checkpoint["model"])
    lm.optimizer.load_state_dict(checkpoint["optimizer"])
    lm.start_step, lm.best_bpc, lm.history = checkpoint["step"], checkpoint["best_bpc"], checkpoint["history"]
    lm.elapsed, lm.saved_step = checkpoint["elapsed_seconds"], checkpoint["step"]
    state = checkpoint["carried_state"]
    lm.state = tuple(part.to(lm.device) for part in state) if isinstance(state, list) else state
    restore_rng_states(checkpoint.get("rng_states", {"cpu": checkpoint.get("rng_state")}))
    # The log keeps the records up to the saved step: whatever a killed run wrote after it is written again.
    metrics_path = lm.out_dir / "metrics.jsonl"
    records = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    kept = [line for line in records if json.loads(line).get("step", math.inf) <= lm.start_step]
    write_lines_atomically(metrics_path, kept)
    warn_if_threads_changed(checkpoint.get("threads"))
    print(f"resumed from step {lm.start_step}", flush=True)


def set_up_language_model(args, device: torch.device, out_dir: Path) -> LanguageModelRun:
    """The books as streams, the model (its size checked first) and optimizer; on --resume, restore last.pt."""
    corpus = load_corpus(args.books)
    train_ids = torch.tensor(corpus.encode(corpus.train))
    windows_per_epoch = (len(train_ids) // args.batch_size - 1) // args.seq_len
    if windows_per_epoch < 1:
        raise RunError(f"the training text ({len(train_ids):,} characters) is too short for --batch-size "
                       f"{args.batch_size} streams of --seq-len {args.seq_len} characters")
    train_streams = into_streams(train_ids, args.batch_size).to(device)  # (B, N)
    config = language_model_config(args, len(corpus.vocabulary))
    check_model_size(recurrent_parameter_count(config.cell, config.embedding_size, config.hidden_size,
                                               config.num_layers) + config.vocab_size * (config.embedding_size
                                                                                         + config.hidden_size + 1))
    torch.manual_seed(args.seed)
    model = CharLanguageModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{config.cell} ({config.impl}), hidden {config.hidden_size} x {config.num_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(corpus.train):,} train / "
          f"{len(corpus.validation):,} validation / {len(corpus.test):,} test characters; {windows_per_epoch} "
          f"windows per epoch", flush=True)
    lm = LanguageModelRun(args, device, out_dir, train_streams, torch.tensor(corpus.encode(corpus.validation)),
                          torch.tensor(corpus.encode(corpus.test)), windows_per_epoch, config, model, optimizer,
                          {"config": model.config_dict(), "books": list(args.books), "vocabulary": corpus.vocabulary})
    if args.resume:
        checkpoint = load_checkpoint(out_dir / "last.pt", "lstm", required=("model", "config", "optimizer", "step"))
        restore_language_model(lm, checkpoint)
    return lm


def language_model_step(lm: LanguageModelRun, step: int) -> float:
    """One truncated-BPTT step on the next window of every stream; returns its bits per character."""
    args, model = lm.args, lm.model
    window = step % lm.windows_per_epoch
    if window == 0:
        lm.state = None  # a new epoch starts each stream from its beginning
    begin = window * args.seq_len
    inputs = lm.train_streams[:, begin : begin + args.seq_len]  # (B, T)
    targets = lm.train_streams[:, begin + 1 : begin + args.seq_len + 1]  # (B, T)
    for group in lm.optimizer.param_groups:
        group["lr"] = cosine_learning_rate(step, args.steps, args.lr)
    logits, lm.state = model(inputs, detach_state(lm.state))  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    train_bpc = loss.item() / math.log(2)
    stop_if_not_finite(train_bpc, "training", step + 1, "last.pt", lm.saved_step)
    lm.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    lm.optimizer.step()
    lm.state = detach_state(lm.state)
    lm.history["train_steps"].append(step + 1)
    lm.history["train_bpc"].append(train_bpc)
    return train_bpc


def validate_language_model(lm: LanguageModelRun, step: int, train_bpc: float, metrics, started: float) -> None:
    """Validation bits per character after `step` steps: logged, then best.pt (if better) and last.pt written."""
    validation_bpc = evaluate_bpc(lm.model, lm.validation_ids)
    stop_if_not_finite(validation_bpc, "validation", step, "last.pt", lm.saved_step)
    lm.elapsed = time.perf_counter() - started
    lm.history["validation_steps"].append(step)
    lm.history["validation_bpc"].append(validation_bpc)
    record = {"step": step, "train_bpc": train_bpc, "validation_bpc": validation_bpc,
              "elapsed_seconds": round(lm.elapsed, 1)}
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    tqdm.write(f"step {step}: validation bpc {validation_bpc:.4f}")
    if validation_bpc < lm.best_bpc:
        lm.best_bpc = validation_bpc
        save_checkpoint(lm.out_dir / "best.pt", checkpoint_payload(lm, step))
    save_checkpoint(lm.out_dir / "last.pt", checkpoint_payload(lm, step))
    lm.saved_step = step


def train_language_model(args, device: torch.device, out_dir: Path, stop: StopFlag):
    """Truncated BPTT over contiguous streams of the books, the state carried from window to window."""
    lm = set_up_language_model(args, device, out_dir)
    metrics = open(out_dir / "metrics.jsonl", "a" if args.resume else "w")  # a fresh run starts a fresh log
    started = time.perf_counter() - lm.elapsed
    progress = tqdm(range(lm.start_step, args.steps), initial=lm.start_step, total=args.steps, desc="train",
                    mininterval=2)
    lm.model.train()
    try:
        for step in progress:
            train_bpc = language_model_step(lm, step)
            progress.set_postfix(bpc=f"{train_bpc:.3f}")
            lm.elapsed = time.perf_counter() - started
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                validate_language_model(lm, step + 1, train_bpc, metrics, started)
            if stop.requested and step + 1 < args.steps:  # a step boundary: the step, its log and checkpoints are done
                if lm.saved_step != step + 1:
                    save_checkpoint(out_dir / "last.pt", checkpoint_payload(lm, step + 1))
                raise StopRequested(f"stopped at step {step + 1}; resume with: {resume_command(args)}")
    except BaseException:  # a stop, a non-finite loss or a second Ctrl-C: the log closes, the checkpoints stay
        metrics.close()
        raise
    finally:
        progress.close()
    finish_language_model(lm, metrics, started)


def finish_language_model(lm: LanguageModelRun, metrics, started: float) -> None:
    """The best checkpoint's test bits per character, summary.json, the final log line and the curves."""
    args, config, out_dir = lm.args, lm.config, lm.out_dir
    best = load_checkpoint(out_dir / "best.pt", "lstm", ("model", "step"))
    lm.model.load_state_dict(best["model"])
    test_bpc = evaluate_bpc(lm.model, lm.test_ids)
    elapsed = time.perf_counter() - started
    summary = {"test_bpc": test_bpc, "best_validation_bpc": lm.best_bpc, "best_step": best["step"],
               "steps": args.steps, "parameters": sum(p.numel() for p in lm.model.parameters()), "cell": config.cell,
               "impl": config.impl, "lr": args.lr, "hidden_size": config.hidden_size,
               "train_seconds": round(elapsed, 1), "threads": torch.get_num_threads(), "device": str(lm.device)}
    metrics.write(json.dumps({"final": summary}) + "\n")
    metrics.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_language_model(lm.history, out_dir / "curves.png", f"{config.cell} ({config.impl}) on Austen")
    print(f"test bpc {test_bpc:.4f} (best validation {lm.best_bpc:.4f} at step {best['step']}), "
          f"{elapsed / 60:.1f} min; wrote {out_dir}/best.pt, last.pt, metrics.jsonl, curves.png", flush=True)
    print(f"sample it with: python lstm/eval.py --checkpoint {out_dir}/best.pt --sample", flush=True)


# ---- the adding problem ----

def adding_config(args, cell: str) -> AddingConfig:
    """The adding model; the RNN's hidden size is matched to the LSTM's parameter count."""
    hidden_size = args.adding_hidden_size
    if cell == "rnn":
        hidden_size = matching_rnn_hidden_size(args.adding_hidden_size, 2, 1, extra_per_hidden=1)
    if cell == "lstm":
        return AddingConfig(hidden_size, 1, cell, args.impl, args.adding_forget_bias)
    return AddingConfig(hidden_size, 1, cell, "torch")


@dataclass
class AddingRun:
    """One model at one length of the adding problem, and where its training stands."""

    args: argparse.Namespace
    name: str  # adding-<cell>-<length>: the prefix of its checkpoints
    last_path: Path
    model: AddingModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws the training batches
    evaluation: tuple  # a fixed batch of 1000 sequences: (inputs, targets)
    run: dict
    history: dict = field(default_factory=lambda: {"steps": [], "mse": []})
    start_step: int = 0
    best_mse: float = float("inf")
    elapsed: float = 0.0  # seconds of the sessions this one resumed
    saved_step: int | None = None
    started: float = field(default_factory=time.perf_counter)


def adding_payload(adding: AddingRun, step: int) -> dict:
    """Model, optimizer, data-generator position and history at `step`."""
    return {**adding.run, "model": adding.model.state_dict(), "optimizer": adding.optimizer.state_dict(),
            "step": step, "best_mse": adding.best_mse, "history": adding.history,
            "generator_state": adding.generator.get_state(),
            "elapsed_seconds": adding.elapsed + time.perf_counter() - adding.started,
            "train_arguments": fixed_arguments(adding.args), "threads": torch.get_num_threads()}


def restore_adding_run(adding: AddingRun, checkpoint: dict) -> None:
    """Put one adding run back where its last checkpoint left it."""
    checkpoint["config"] = {**asdict(AddingConfig()), **checkpoint["config"]}  # defaults for fields added later
    check_resumable(checkpoint, adding.last_path, adding.args, adding.run["config"])
    adding.model.load_state_dict(checkpoint["model"])
    adding.optimizer.load_state_dict(checkpoint["optimizer"])
    adding.start_step, adding.best_mse = checkpoint["step"], checkpoint["best_mse"]
    adding.history = checkpoint["history"]
    adding.generator.set_state(checkpoint["generator_state"].cpu())
    adding.elapsed, adding.saved_step = checkpoint.get("elapsed_seconds", 0.0), checkpoint["step"]
    warn_if_threads_changed(checkpoint.get("threads"))


def set_up_adding_run(args, device, out_dir: Path, cell: str, length: int) -> AddingRun:
    """The model, its optimizer, its batch generator and evaluation batch; restored from its last.pt on --resume."""
    config = adding_config(args, cell)
    check_model_size(recurrent_parameter_count(cell, 2, config.hidden_size, 1) + config.hidden_size + 1)
    torch.manual_seed(args.seed)
    model = AddingModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.adding_lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + length)
    inputs, targets = adding_batch(1000, length, torch.Generator().manual_seed(12345 + length))
    name = f"adding-{cell}-{length}"
    adding = AddingRun(args, name, out_dir / f"{name}-last.pt", model, optimizer, generator,
                       (inputs.to(device), targets.to(device)),
                       {"config": vars(config) | {"length": length}, "task": "adding"})
    if args.resume and adding.last_path.is_file():
        restore_adding_run(adding, load_checkpoint(adding.last_path, "lstm",
                                                   required=("model", "config", "optimizer", "step")))
    adding.started = time.perf_counter()
    return adding


@torch.no_grad()
def evaluation_mse(adding: AddingRun, step: int) -> float:
    """MSE on the fixed batch of 1000 sequences; a non-finite one ends the run before anything is written."""
    adding.model.eval()
    error = F.mse_loss(adding.model(adding.evaluation[0]), adding.evaluation[1]).item()
    adding.model.train()
    stop_if_not_finite(error, "validation", step, adding.last_path.name, adding.saved_step)
    return error


def train_adding_run(args, device, out_dir: Path, cell: str, length: int, stop: StopFlag) -> dict:
    """One model at one length; returns its history of evaluation MSE. Resumable from its own last checkpoint."""
    adding = set_up_adding_run(args, device, out_dir, cell, length)
    if not adding.history["steps"]:
        adding.history["steps"].append(0)
        adding.history["mse"].append(evaluation_mse(adding, 0))
    progress = tqdm(range(adding.start_step, args.adding_steps), initial=adding.start_step, total=args.adding_steps,
                    desc=f"{cell} T={length}", mininterval=2)
    try:
        for step in progress:
            inputs, targets = adding_batch(args.adding_batch_size, length, adding.generator)
            loss = F.mse_loss(adding.model(inputs.to(device)), targets.to(device))
            stop_if_not_finite(loss.item(), "training", step + 1, adding.last_path.name, adding.saved_step)
            adding.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adding.model.parameters(), args.grad_clip)
            adding.optimizer.step()
            if (step + 1) % 25 == 0 or step + 1 == args.adding_steps:
                mse = evaluation_mse(adding, step + 1)
                adding.history["steps"].append(step + 1)
                adding.history["mse"].append(mse)
                progress.set_postfix(mse=f"{mse:.4f}")
                if mse < adding.best_mse:
                    adding.best_mse = mse
                    save_checkpoint(out_dir / f"{adding.name}-best.pt", adding_payload(adding, step + 1))
            if (step + 1) % 250 == 0 or step + 1 == args.adding_steps:
                save_checkpoint(adding.last_path, adding_payload(adding, step + 1))
                adding.saved_step = step + 1
            if stop.requested and step + 1 < args.adding_steps:  # a step boundary
                if adding.saved_step != step + 1:
                    save_checkpoint(adding.last_path, adding_payload(adding, step + 1))
                raise StopRequested(f"stopped at step {step + 1} of {adding.name}; resume with: {resume_command(args)}")
    finally:
        progress.close()
    return {"cell": cell, "length": length, "hidden_size": adding.run["config"]["hidden_size"],
            "parameters": sum(p.numel() for p in adding.model.parameters()), "final_mse": adding.history["mse"][-1],
            "best_mse": adding.best_mse, "seconds": round(adding.elapsed + time.perf_counter() - adding.started, 1),
            "history": adding.history}


def plot_adding(results: list[dict], path: Path):
    """Evaluation MSE against steps: one panel per sequence length, LSTM and RNN in each."""
    lengths = sorted({result["length"] for result in results})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True, squeeze=False)
    for axis, length in zip(axes[0], lengths):
        for result in (r for r in results if r["length"] == length):
            axis.plot(result["history"]["steps"], result["history"]["mse"], label=f"{result['cell'].upper()}")
        axis.axhline(TRIVIAL_ADDING_MSE, color="grey", linestyle="--", label="always 1.0 (0.167)")
        axis.axhline(0.01, color="green", linestyle=":", label="target 0.01")
        axis.set_yscale("log")
        axis.set_title(f"adding problem, T = {length}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("MSE on 1000 held-out sequences")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def train_adding(args, device, out_dir: Path, stop: StopFlag):
    """Every (length, cell) pair in turn, then the comparison plot. metrics.jsonl holds one line per finished run."""
    biggest = max(max(args.lengths) * max(args.adding_batch_size, 1000) * 2, 0)
    if biggest > MAX_BATCH_ELEMENTS:
        raise RunError(f"--lengths up to {max(args.lengths):,} with batches of {max(args.adding_batch_size, 1000):,} "
                       f"sequences hold {biggest:,} numbers, more than this script builds ({MAX_BATCH_ELEMENTS:,})")
    metrics_path = out_dir / "metrics.jsonl"
    if not args.resume:
        metrics_path.write_text("")  # a fresh run starts a fresh log
    results = []
    for length in args.lengths:
        for cell in args.cells:
            result = train_adding_run(args, device, out_dir, cell, length, stop)
            results.append(result)
            summary = {key: value for key, value in result.items() if key != "history"}
            # One line per (cell, length): a run finished again after --resume replaces its earlier line.
            lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
            lines = [line for line in lines if (json.loads(line)["cell"], json.loads(line)["length"]) != (cell, length)]
            write_lines_atomically(metrics_path, lines + [json.dumps(summary)])
            print(json.dumps(summary), flush=True)
    plot_adding(results, out_dir / "adding.png")
    print(f"wrote {out_dir / 'adding.png'}")


def main(argv=None):
    """Parse, run the chosen task, and turn user mistakes into one line on stderr; a Ctrl-C stop exits with 130."""
    args = parse_args(argv)
    stop = None
    try:
        device = pick_device(args.device)
        out_dir = Path(args.out_dir)
        check_run_folder(out_dir, args.resume, args.overwrite, checkpoints=CHECKPOINT_PATTERNS,
                         resume_from="last.pt" if args.task == "lm" else "adding-*-last.pt")
        if args.overwrite:
            remove_run_files(out_dir, RUN_FILES)
        out_dir.mkdir(parents=True, exist_ok=True)
        stop = StopFlag()  # Ctrl-C from here on asks the loop to stop at the next step boundary
        if args.task == "lm":
            train_language_model(args, device, out_dir, stop)
        else:
            train_adding(args, device, out_dir, stop)
    except StopRequested as stopped:
        print(f"\n{stopped}", flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except (RunError, DataError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, leaving the checkpoints as they were
        fail("interrupted twice: stopped at once; the checkpoints in --out-dir hold the last saved step")
    finally:
        if stop is not None:
            stop.close()


if __name__ == "__main__":
    main()
