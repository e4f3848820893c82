"""Train the chapter's models: a character language model on Jane Austen (default), or the adding problem.

    python lstm/train.py                                        # hand-written LSTM language model
    python lstm/train.py --impl torch --out-dir runs/lstm-torch # the same with torch.nn.LSTM
    python lstm/train.py --cell rnn --out-dir runs/lstm-rnn     # the tanh RNN baseline, same parameter count
    python lstm/train.py --task adding --out-dir runs/lstm-adding
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
)
from lstm.tasks import DEFAULT_BOOKS, adding_batch, into_streams, load_corpus  # noqa: E402

TRIVIAL_ADDING_MSE = 1 / 6  # always answering 1.0: the variance of a sum of two uniform values
# Each model's peak learning rate from the README's sweep: the RNN is best at 3e-3 and diverges at 2e-2; the LSTM is
# as good at 1e-2 as at 2e-2 (within run-to-run noise) and unstable at 3e-2.
DEFAULT_LEARNING_RATES = {"lstm": 1e-2, "rnn": 3e-3}


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr."""


def fail(message: str):
    """End the program with one line on stderr, `error: <message>`, and exit code 1 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _number(text: str, kind, low: float, low_inclusive: bool, high: float = math.inf, description: str = ""):
    """Parse `text` as a finite int or float in a range, or raise argparse's one-line error naming the range."""
    try:
        value = kind(text)
        finite = math.isfinite(float(value))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}") from None
    if not finite or value < low or (value == low and not low_inclusive) or value >= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, 1, True, description="a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, 0, True, description="a non-negative integer")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, 0.0, False, description="a positive finite number")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, 0.0, True, description="a non-negative finite number")


def finite_float(text: str) -> float:
    """Any finite number."""
    return _number(text, float, -math.inf, True, description="a finite number")


def probability(text: str) -> float:
    """A number in [0, 1)."""
    return _number(text, float, 0.0, True, 1.0, description="a probability in [0, 1)")


def parse_args(argv=None):
    """The command line; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["lm", "adding"], default="lm", help="language model, or the adding problem")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten",
                        help="the LSTM written in model.py, or torch.nn.LSTM")
    parser.add_argument("--backward", choices=["handwritten", "autograd"], default="handwritten",
                        help="--impl handwritten: each layer's backward written out (LSTMLayerFunction), or autograd "
                             "through the same forward code")
    parser.add_argument("--cell", choices=["lstm", "rnn"], default="lstm",
                        help="lm task: the LSTM, or the tanh RNN baseline sized to the LSTM's parameter count")
    parser.add_argument("--books", nargs="+", default=list(DEFAULT_BOOKS), help="Gutenberg files to train on")
    parser.add_argument("--hidden-size", type=int, default=256, help="LSTM hidden size (the RNN's is matched)")
    parser.add_argument("--num-layers", type=int, default=2, help="stacked recurrent layers")
    parser.add_argument("--embedding-size", type=int, default=64, help="character embedding size")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout between layers and before the read-out")
    parser.add_argument("--seq-len", type=int, default=100, help="characters per truncated-BPTT window")
    parser.add_argument("--batch-size", type=int, default=64, help="parallel text streams per step")
    parser.add_argument("--steps", type=int, default=1300, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak Adam learning rate, cosine decay to 10%% (default: 1e-2 for the LSTM, 3e-3 for the "
                             "RNN, from the README's sweep)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation passes")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200], help="adding: sequence lengths")
    parser.add_argument("--cells", nargs="+", choices=["lstm", "rnn"], default=["lstm", "rnn"],
                        help="adding: models to compare")
    parser.add_argument("--adding-steps", type=int, default=1500, help="adding: optimizer steps per run")
    parser.add_argument("--adding-hidden-size", type=int, default=64, help="adding: LSTM hidden size")
    parser.add_argument("--adding-batch-size", type=int, default=64, help="adding: sequences per step")
    parser.add_argument("--adding-lr", type=float, default=1e-2, help="adding: Adam learning rate")
    parser.add_argument("--adding-forget-bias", type=float, default=0.0,
                        help="adding: the LSTM's starting forget-gate bias (0: gates start at sigma(0) = 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/lstm", help="checkpoints, metrics.jsonl and plots go here")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    args = parser.parse_args(argv)
    positive = ["hidden_size", "num_layers", "embedding_size", "seq_len", "batch_size", "steps", "eval_every",
                "adding_steps", "adding_hidden_size", "adding_batch_size"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.lr is None:
        args.lr = DEFAULT_LEARNING_RATES[args.cell]
    if args.lr <= 0 or args.adding_lr <= 0:
        parser.error("learning rates must be positive")
    if any(length < 2 for length in args.lengths):
        parser.error("--lengths must be at least 2")
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


def save_checkpoint(path: Path, payload: dict):
    """Write atomically: a temporary file in the same folder, then a rename, so a good checkpoint is never half-lost."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, device) -> dict:
    """Load a checkpoint of this chapter, or raise a UserError that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this chapter")
    return checkpoint


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


def train_language_model(args, device: torch.device, out_dir: Path):
    """Truncated BPTT over contiguous streams of the books, the state carried from window to window."""
    corpus = load_corpus(args.books)
    train_streams = into_streams(torch.tensor(corpus.encode(corpus.train)), args.batch_size).to(device)  # (B, N)
    validation_ids = torch.tensor(corpus.encode(corpus.validation))
    test_ids = torch.tensor(corpus.encode(corpus.test))
    windows_per_epoch = (train_streams.shape[1] - 1) // args.seq_len
    config = language_model_config(args, len(corpus.vocabulary))
    torch.manual_seed(args.seed)
    model = CharLanguageModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    parameter_count = sum(p.numel() for p in model.parameters())
    print(f"{config.cell} ({config.impl}), hidden {config.hidden_size} x {config.num_layers} layers, "
          f"{parameter_count:,} parameters; {len(corpus.train):,} train / {len(corpus.validation):,} validation / "
          f"{len(corpus.test):,} test characters; {windows_per_epoch} windows per epoch", flush=True)

    run = {"config": model.config_dict(), "books": list(args.books), "vocabulary": corpus.vocabulary}
    history = {"train_steps": [], "train_bpc": [], "validation_steps": [], "validation_bpc": []}
    start_step, best_bpc, state, elapsed = 0, float("inf"), None, 0.0
    if args.resume:
        checkpoint = load_checkpoint(out_dir / "last.pt", device)
        if checkpoint["config"] != run["config"] or checkpoint.get("books") != run["books"]:
            raise UserError(f"{out_dir / 'last.pt'} was trained with another config; use a new --out-dir")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, best_bpc, history = checkpoint["step"], checkpoint["best_bpc"], checkpoint["history"]
        elapsed = checkpoint["elapsed_seconds"]
        state = checkpoint["carried_state"]
        state = tuple(state) if isinstance(state, list) else state
        torch.set_rng_state(checkpoint["rng_state"].cpu())
        print(f"resumed from step {start_step}", flush=True)

    def checkpoint_payload(step):
        """Everything needed to evaluate the model or to resume training from `step`."""
        carried = list(state) if isinstance(state, tuple) else state
        return {**run, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_bpc": best_bpc, "history": history, "carried_state": carried,
                "rng_state": torch.get_rng_state(), "elapsed_seconds": elapsed}

    metrics = open(out_dir / "metrics.jsonl", "a" if args.resume else "w")  # a fresh run starts a fresh log
    step = start_step
    started = time.perf_counter() - elapsed
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train", mininterval=2)
    try:
        model.train()
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            state = detach_state(state)
            train_bpc = loss.item() / math.log(2)
            history["train_steps"].append(step + 1)
            history["train_bpc"].append(train_bpc)
            progress.set_postfix(bpc=f"{train_bpc:.3f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                validation_bpc = evaluate_bpc(model, validation_ids)
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
    except KeyboardInterrupt:
        elapsed = time.perf_counter() - started
        save_checkpoint(out_dir / "last.pt", checkpoint_payload(step))
        print(f"\ninterrupted: saved {out_dir / 'last.pt'} at step {step}; continue with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    progress.close()

    best = load_checkpoint(out_dir / "best.pt", device)
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


def adding_config(args, cell: str) -> AddingConfig:
    """The adding model; the RNN's hidden size is matched to the LSTM's parameter count."""
    hidden_size = args.adding_hidden_size
    if cell == "rnn":
        hidden_size = matching_rnn_hidden_size(args.adding_hidden_size, 2, 1, extra_per_hidden=1)
    if cell == "lstm":
        return AddingConfig(hidden_size, 1, cell, args.impl, args.adding_forget_bias)
    return AddingConfig(hidden_size, 1, cell, "torch")


def train_adding_run(args, device, out_dir: Path, cell: str, length: int) -> dict:
    """One model at one length; returns its history of evaluation MSE. Resumable from its own last checkpoint."""
    config = adding_config(args, cell)
    torch.manual_seed(args.seed)
    model = AddingModel(config, args.backward).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.adding_lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + length)
    evaluation_inputs, evaluation_targets = adding_batch(1000, length, torch.Generator().manual_seed(12345 + length))
    evaluation_inputs, evaluation_targets = evaluation_inputs.to(device), evaluation_targets.to(device)
    name = f"adding-{cell}-{length}"
    run = {"config": vars(config) | {"length": length}, "task": "adding"}
    history = {"steps": [], "mse": []}
    start_step, best_mse, elapsed = 0, float("inf"), 0.0
    last_path = out_dir / f"{name}-last.pt"
    if args.resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, device)
        if {**asdict(AddingConfig()), **checkpoint["config"]} != run["config"]:  # defaults for fields added later
            raise UserError(f"{last_path} was trained with another config; use a new --out-dir")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, best_mse, history = checkpoint["step"], checkpoint["best_mse"], checkpoint["history"]
        generator.set_state(checkpoint["generator_state"].cpu())
        elapsed = checkpoint.get("elapsed_seconds", 0.0)

    def payload(step):
        """Model, optimizer, data-generator position and history at `step`."""
        return {**run, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_mse": best_mse, "history": history, "generator_state": generator.get_state(),
                "elapsed_seconds": elapsed + time.perf_counter() - started}

    @torch.no_grad()
    def evaluation_mse():
        """MSE on a fixed batch of 1000 sequences."""
        model.eval()
        error = F.mse_loss(model(evaluation_inputs), evaluation_targets).item()
        model.train()
        return error

    if not history["steps"]:
        history["steps"].append(0)
        history["mse"].append(evaluation_mse())
    step = start_step
    started = time.perf_counter()
    progress = tqdm(range(start_step, args.adding_steps), initial=start_step, total=args.adding_steps,
                    desc=f"{cell} T={length}", mininterval=2)
    try:
        for step in progress:
            inputs, targets = adding_batch(args.adding_batch_size, length, generator)
            loss = F.mse_loss(model(inputs.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if (step + 1) % 25 == 0 or step + 1 == args.adding_steps:
                mse = evaluation_mse()
                history["steps"].append(step + 1)
                history["mse"].append(mse)
                progress.set_postfix(mse=f"{mse:.4f}")
                if mse < best_mse:
                    best_mse = mse
                    save_checkpoint(out_dir / f"{name}-best.pt", payload(step + 1))
            if (step + 1) % 250 == 0 or step + 1 == args.adding_steps:
                save_checkpoint(last_path, payload(step + 1))
    except KeyboardInterrupt:
        save_checkpoint(last_path, payload(step))
        print(f"\ninterrupted: saved {last_path} at step {step}; continue with --resume", file=sys.stderr)
        raise SystemExit(130) from None
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


def train_adding(args, device, out_dir: Path):
    """Every (length, cell) pair in turn, then the comparison plot."""
    results = []
    if not args.resume:
        (out_dir / "metrics.jsonl").write_text("")  # a fresh run starts a fresh log
    for length in args.lengths:
        for cell in args.cells:
            result = train_adding_run(args, device, out_dir, cell, length)
            results.append(result)
            summary = {key: value for key, value in result.items() if key != "history"}
            with open(out_dir / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps(summary) + "\n")
            print(json.dumps(summary), flush=True)
    plot_adding(results, out_dir / "adding.png")
    print(f"wrote {out_dir / 'adding.png'}")


def main(argv=None):
    """Parse, run the chosen task, and turn user mistakes into one line on stderr."""
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.task == "lm":
            train_language_model(args, device, out_dir)
        else:
            train_adding(args, device, out_dir)
    except (UserError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
