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
import os
import sys
import time
from dataclasses import asdict
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
    CheckpointError,
    StopFlag,
    changed_setting,
    finite_float,
    int_in_range,
    load_checkpoint,
    positive_float,
    positive_int,
    prepare_run_folder,
    probability,
    save_checkpoint,
    seed_int,
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


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr."""


class StopRequested(Exception):
    """Ctrl-C was pressed: the state at a step boundary is saved, and the run ends with this message, exit code 0."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run ends before writing anything, exit code 1."""


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
    parser.add_argument("--threads", type=int_in_range(1, 1024), default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1; the README measures 1 "
                             "against 2)")
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


def pick_device(name: str) -> torch.device:
    """auto: CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def fixed_arguments(args) -> dict:
    """The FIXED_ON_RESUME arguments of this run, as saved in every checkpoint."""
    return {name: getattr(args, name) for name in FIXED_ON_RESUME}


def check_resumable(checkpoint: dict, path: Path, args, config: dict):
    """Refuse, in one line, to resume with a changed FIXED_ON_RESUME argument or another model."""
    saved = checkpoint.get("train_arguments", {})
    current = fixed_arguments(args)
    shown = [{name: " ".join(value) if isinstance(value, list) else value for name, value in arguments.items()}
             for arguments in (saved, current)]
    change = changed_setting(*shown, FIXED_ON_RESUME)
    if change:
        raise UserError(change)
    if checkpoint["config"] != config:
        raise UserError(f"{path} was trained with another config; use a new --out-dir")


def rng_states(device: torch.device) -> dict:
    """The random generators training draws from (dropout), as CPU tensors."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = [state.cpu() for state in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict, device: torch.device):
    """Put the generators back where a checkpoint left them (from its CPU copies)."""
    torch.set_rng_state(states["cpu"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


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


def good_state_note(name: str, saved_step) -> str:
    """Which checkpoint holds the last good state, for the non-finite-loss message."""
    if saved_step is None:
        return "no checkpoint was written yet"
    return f"{name} (step {saved_step}) holds the last good state"


def write_lines_atomically(path: Path, lines: list[str]):
    """Replace a text file by `lines` (temporary file, then rename)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines))
    os.replace(temporary, path)


def check_model_size(parameters: int):
    """Refuse a model too large for this chapter's scripts before allocating it."""
    if parameters > MAX_PARAMETERS:
        raise UserError(f"the model would have {parameters:,} parameters, more than this script builds "
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


def train_language_model(args, device: torch.device, out_dir: Path, stop: StopFlag):
    """Truncated BPTT over contiguous streams of the books, the state carried from window to window."""
    corpus = load_corpus(args.books)
    train_ids = torch.tensor(corpus.encode(corpus.train))
    windows_per_epoch = (len(train_ids) // args.batch_size - 1) // args.seq_len
    if windows_per_epoch < 1:
        raise UserError(f"the training text ({len(train_ids):,} characters) is too short for --batch-size "
                        f"{args.batch_size} streams of --seq-len {args.seq_len} characters")
    train_streams = into_streams(train_ids, args.batch_size).to(device)  # (B, N)
    validation_ids = torch.tensor(corpus.encode(corpus.validation))
    test_ids = torch.tensor(corpus.encode(corpus.test))
    config = language_model_config(args, len(corpus.vocabulary))
    check_model_size(recurrent_parameter_count(config.cell, config.embedding_size, config.hidden_size,
                                               config.num_layers) + config.vocab_size * (config.embedding_size
                                                                                         + config.hidden_size + 1))
    torch.manual_seed(args.seed)
    model = CharLanguageModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    parameter_count = sum(p.numel() for p in model.parameters())
    print(f"{config.cell} ({config.impl}), hidden {config.hidden_size} x {config.num_layers} layers, "
          f"{parameter_count:,} parameters; {len(corpus.train):,} train / {len(corpus.validation):,} validation / "
          f"{len(corpus.test):,} test characters; {windows_per_epoch} windows per epoch", flush=True)

    run = {"config": model.config_dict(), "books": list(args.books), "vocabulary": corpus.vocabulary}
    history = {"train_steps": [], "train_bpc": [], "validation_steps": [], "validation_bpc": []}
    start_step, best_bpc, state, elapsed, saved_step = 0, float("inf"), None, 0.0, None
    metrics_path = out_dir / "metrics.jsonl"
    if args.resume:
        checkpoint = load_checkpoint(out_dir / "last.pt", "lstm", required=("model", "config", "optimizer", "step"))
        check_resumable(checkpoint, out_dir / "last.pt", args, run["config"])
        if checkpoint.get("books") != run["books"]:
            raise UserError(f"{out_dir / 'last.pt'} was trained on other books; use a new --out-dir")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, best_bpc, history = checkpoint["step"], checkpoint["best_bpc"], checkpoint["history"]
        elapsed, saved_step = checkpoint["elapsed_seconds"], checkpoint["step"]
        state = checkpoint["carried_state"]
        state = tuple(part.to(device) for part in state) if isinstance(state, list) else state
        restore_rng_states(checkpoint.get("rng_states", {"cpu": checkpoint.get("rng_state")}), device)
        # The log keeps the records up to the saved step: whatever a killed run wrote after it is written again.
        records = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        kept = [line for line in records if json.loads(line).get("step", math.inf) <= start_step]
        write_lines_atomically(metrics_path, kept)
        print(f"resumed from step {start_step}", flush=True)

    def checkpoint_payload(step):
        """Everything needed to evaluate the model or to resume training from `step`."""
        carried = [part.cpu() for part in state] if isinstance(state, tuple) else state
        return {**run, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_bpc": best_bpc, "history": history, "carried_state": carried, "rng_states": rng_states(device),
                "elapsed_seconds": elapsed, "train_arguments": fixed_arguments(args)}

    metrics = open(metrics_path, "a" if args.resume else "w")  # a fresh run starts a fresh log
    started = time.perf_counter() - elapsed
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train", mininterval=2)
    model.train()
    try:
        for step in progress:
            window = step % windows_per_epoch
            if window == 0:
                state = None  # a new epoch starts each stream from its beginning
            begin = window * args.seq_len
            inputs = train_streams[:, begin : begin + args.seq_len]  # (B, T)
            targets = train_streams[:, begin + 1 : begin + args.seq_len + 1]  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = cosine_learning_rate(step, args.steps, args.lr)
            logits, state = model(inputs, detach_state(state))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            train_bpc = loss.item() / math.log(2)
            if not math.isfinite(train_bpc):
                raise NonFiniteLoss(f"the training loss is not finite at step {step + 1}; stopped without saving: "
                                    f"{good_state_note('last.pt', saved_step)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            state = detach_state(state)
            history["train_steps"].append(step + 1)
            history["train_bpc"].append(train_bpc)
            progress.set_postfix(bpc=f"{train_bpc:.3f}")
            elapsed = time.perf_counter() - started
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                validation_bpc = evaluate_bpc(model, validation_ids)
                if not math.isfinite(validation_bpc):
                    raise NonFiniteLoss(f"the validation loss is not finite at step {step + 1}; stopped without "
                                        f"saving: {good_state_note('last.pt', saved_step)}")
                elapsed = time.perf_counter() - started
                history["validation_steps"].append(step + 1)
                history["validation_bpc"].append(validation_bpc)
                record = {"step": step + 1, "train_bpc": train_bpc, "validation_bpc": validation_bpc,
                          "elapsed_seconds": round(elapsed, 1)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                tqdm.write(f"step {step + 1}: validation bpc {validation_bpc:.4f}")
                if validation_bpc < best_bpc:
                    best_bpc = validation_bpc
                    save_checkpoint(out_dir / "best.pt", checkpoint_payload(step + 1))
                save_checkpoint(out_dir / "last.pt", checkpoint_payload(step + 1))
                saved_step = step + 1
            if stop.requested and step + 1 < args.steps:  # a step boundary: the step, its log and checkpoints are done
                if saved_step != step + 1:
                    save_checkpoint(out_dir / "last.pt", checkpoint_payload(step + 1))
                raise StopRequested(f"stopped at step {step + 1}; resume with: {resume_command(args)}")
    except BaseException:  # a stop, a non-finite loss or a second Ctrl-C: the log closes, the checkpoints stay
        metrics.close()
        raise
    finally:
        progress.close()

    best = load_checkpoint(out_dir / "best.pt", "lstm")
    model.load_state_dict(best["model"])
    test_bpc = evaluate_bpc(model, test_ids)
    elapsed = time.perf_counter() - started
    summary = {"test_bpc": test_bpc, "best_validation_bpc": best_bpc, "best_step": best["step"], "steps": args.steps,
               "parameters": parameter_count, "cell": config.cell, "impl": config.impl, "lr": args.lr,
               "hidden_size": config.hidden_size, "train_seconds": round(elapsed, 1),
               "threads": torch.get_num_threads(), "device": str(device)}
    metrics.write(json.dumps({"final": summary}) + "\n")
    metrics.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_language_model(history, out_dir / "curves.png", f"{config.cell} ({config.impl}) on Austen")
    print(f"test bpc {test_bpc:.4f} (best validation {best_bpc:.4f} at step {best['step']}), "
          f"{elapsed / 60:.1f} min; wrote {out_dir}/best.pt, last.pt, metrics.jsonl, curves.png", flush=True)
    print(f"sample it with: python lstm/eval.py --checkpoint {out_dir}/best.pt --sample", flush=True)


def adding_config(args, cell: str) -> AddingConfig:
    """The adding model; the RNN's hidden size is matched to the LSTM's parameter count."""
    hidden_size = args.adding_hidden_size
    if cell == "rnn":
        hidden_size = matching_rnn_hidden_size(args.adding_hidden_size, 2, 1, extra_per_hidden=1)
    if cell == "lstm":
        return AddingConfig(hidden_size, 1, cell, args.impl, args.adding_forget_bias)
    return AddingConfig(hidden_size, 1, cell, "torch")


def train_adding_run(args, device, out_dir: Path, cell: str, length: int, stop: StopFlag) -> dict:
    """One model at one length; returns its history of evaluation MSE. Resumable from its own last checkpoint."""
    config = adding_config(args, cell)
    check_model_size(recurrent_parameter_count(cell, 2, config.hidden_size, 1) + config.hidden_size + 1)
    torch.manual_seed(args.seed)
    model = AddingModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.adding_lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + length)
    evaluation_inputs, evaluation_targets = adding_batch(1000, length, torch.Generator().manual_seed(12345 + length))
    evaluation_inputs, evaluation_targets = evaluation_inputs.to(device), evaluation_targets.to(device)
    name = f"adding-{cell}-{length}"
    run = {"config": vars(config) | {"length": length}, "task": "adding"}
    history = {"steps": [], "mse": []}
    start_step, best_mse, elapsed, saved_step = 0, float("inf"), 0.0, None
    last_path = out_dir / f"{name}-last.pt"
    if args.resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, "lstm", required=("model", "config", "optimizer", "step"))
        checkpoint["config"] = {**asdict(AddingConfig()), **checkpoint["config"]}  # defaults for fields added later
        check_resumable(checkpoint, last_path, args, run["config"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, best_mse, history = checkpoint["step"], checkpoint["best_mse"], checkpoint["history"]
        generator.set_state(checkpoint["generator_state"].cpu())
        elapsed, saved_step = checkpoint.get("elapsed_seconds", 0.0), checkpoint["step"]

    def payload(step):
        """Model, optimizer, data-generator position and history at `step`."""
        return {**run, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_mse": best_mse, "history": history, "generator_state": generator.get_state(),
                "elapsed_seconds": elapsed + time.perf_counter() - started, "train_arguments": fixed_arguments(args)}

    @torch.no_grad()
    def evaluation_mse(step):
        """MSE on a fixed batch of 1000 sequences; a non-finite one ends the run before anything is written."""
        model.eval()
        error = F.mse_loss(model(evaluation_inputs), evaluation_targets).item()
        model.train()
        if not math.isfinite(error):
            raise NonFiniteLoss(f"the validation loss is not finite at step {step}; stopped without saving: "
                                f"{good_state_note(last_path.name, saved_step)}")
        return error

    started = time.perf_counter()
    if not history["steps"]:
        history["steps"].append(0)
        history["mse"].append(evaluation_mse(0))
    progress = tqdm(range(start_step, args.adding_steps), initial=start_step, total=args.adding_steps,
                    desc=f"{cell} T={length}", mininterval=2)
    try:
        for step in progress:
            inputs, targets = adding_batch(args.adding_batch_size, length, generator)
            loss = F.mse_loss(model(inputs.to(device)), targets.to(device))
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss(f"the training loss is not finite at step {step + 1}; stopped without saving: "
                                    f"{good_state_note(last_path.name, saved_step)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if (step + 1) % 25 == 0 or step + 1 == args.adding_steps:
                mse = evaluation_mse(step + 1)
                history["steps"].append(step + 1)
                history["mse"].append(mse)
                progress.set_postfix(mse=f"{mse:.4f}")
                if mse < best_mse:
                    best_mse = mse
                    save_checkpoint(out_dir / f"{name}-best.pt", payload(step + 1))
            if (step + 1) % 250 == 0 or step + 1 == args.adding_steps:
                save_checkpoint(last_path, payload(step + 1))
                saved_step = step + 1
            if stop.requested and step + 1 < args.adding_steps:  # a step boundary
                if saved_step != step + 1:
                    save_checkpoint(last_path, payload(step + 1))
                raise StopRequested(f"stopped at step {step + 1} of {name}; resume with: {resume_command(args)}")
    finally:
        progress.close()
    seconds = elapsed + time.perf_counter() - started
    return {"cell": cell, "length": length, "hidden_size": config.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()), "final_mse": history["mse"][-1],
            "best_mse": best_mse, "seconds": round(seconds, 1), "history": history}


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
        raise UserError(f"--lengths up to {max(args.lengths):,} with batches of {max(args.adding_batch_size, 1000):,} "
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
    """Parse, run the chosen task, and turn user mistakes into one line on stderr."""
    args = parse_args(argv)
    if args.threads or "OMP_NUM_THREADS" not in os.environ:  # --threads, else OMP_NUM_THREADS, else 1
        torch.set_num_threads(args.threads or 1)
    stop = None
    try:
        device = pick_device(args.device)
        out_dir = Path(args.out_dir)
        prepare_run_folder(out_dir, args.resume, args.overwrite,
                           resume_from="last.pt" if args.task == "lm" else "adding-*-last.pt")
        out_dir.mkdir(parents=True, exist_ok=True)
        stop = StopFlag()  # Ctrl-C from here on asks the loop to stop at the next step boundary
        if args.task == "lm":
            train_language_model(args, device, out_dir, stop)
        else:
            train_adding(args, device, out_dir, stop)
    except StopRequested as stopped:
        print(f"\n{stopped}", flush=True)
    except (UserError, CheckpointError, NonFiniteLoss, DataError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, leaving the checkpoints as they were
        fail("interrupted twice: stopped at once; the checkpoints in --out-dir hold the last saved step")
    finally:
        if stop is not None:
            stop.close()


if __name__ == "__main__":
    main()
