"""Run handling, the same in every chapter: range-checked flags, the device, the run folder, and Ctrl-C."""

import argparse
import math
import signal
from pathlib import Path

import torch

LARGEST_INT = 2**63 - 1  # what a torch int64 (and a seed) can hold


class RunError(Exception):
    """A run folder that cannot be used as asked (it holds a run, it is a file, there is nothing to resume)."""


def _number(text, convert, accept, description):
    """Parse `text` with `convert`; refuse NaN, infinities and anything `accept` rejects, naming the range."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
    return value


def positive_int(text):
    """An integer in [1, 2**63)."""
    return _number(text, int, lambda value: 1 <= value <= LARGEST_INT, "a positive integer")


def non_negative_int(text):
    """An integer in [0, 2**63)."""
    return _number(text, int, lambda value: 0 <= value <= LARGEST_INT, "an integer >= 0")


def positive_float(text):
    """A finite number > 0."""
    return _number(text, float, lambda value: value > 0, "a finite number > 0")


def non_negative_float(text):
    """A finite number >= 0."""
    return _number(text, float, lambda value: value >= 0, "a finite number >= 0")


def probability(text):
    """A number in [0, 1)."""
    return _number(text, float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def int_in_range(low, high):
    """An argparse type for integers in [low, high] (for sizes that would not fit in memory beyond `high`)."""

    def parse(text):
        return _number(text, int, lambda value: low <= value <= high, f"an integer in [{low}, {high}]")

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def pick_device(name):
    """Resolve --device: auto picks cuda, then mps, then cpu; anything else is a ValueError with one line."""
    mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if name == "mps" and not mps_available:
        raise ValueError("--device mps but MPS is not available")
    return torch.device(name)


# Every file rnn/train.py (and rnn/eval.py's confusion matrix) writes into a run folder; --overwrite removes these.
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp",
             "curves.png", "confusion.png")


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool):
    """Check the run folder before any work: never start over a run that is there unless told to."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out-dir {out_dir} is a file, not a folder")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    if not existing.is_dir():
        raise RunError(f"--out-dir {out_dir} cannot be created: {existing} is a file")
    if resume and overwrite:
        raise RunError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    if resume:
        if not (out_dir / "last.pt").is_file():
            raise RunError(f"cannot resume: {out_dir / 'last.pt'} does not exist")
        return
    held = [name for name in ("last.pt", "best.pt") if (out_dir / name).exists()]
    if held and not overwrite:
        raise RunError(f"{out_dir} already holds a run ({held[0]}); pass --resume to continue it, --out-dir DIR to "
                       "start a new run elsewhere, or --overwrite to replace it")
    if overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)


class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C aborts at once)."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.requested = True

    def close(self):
        signal.signal(signal.SIGINT, self.previous)
