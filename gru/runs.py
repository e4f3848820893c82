"""Run handling: range-checked flags, one run per folder, Ctrl-C then --resume, checkpoints that are never half written.

Every chapter of this project carries the same small block under the same names, so that a reader who has learnt
one chapter's run handling knows them all.
"""

import argparse
import math
import os
import signal
import warnings
from pathlib import Path

import torch

LARGEST_INT = 2**63 - 1  # what a torch int64 (and a seed) can hold
# The files a training run (and eval.py's confusion picture) writes into its --out-dir; --overwrite removes these.
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "curves.png",
             "confusion.png")


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing or unreadable file, a run folder in the way): one line."""


# ---- argparse types: each states its range and refuses NaN and infinity ----

def _number(text: str, convert, accept, description: str):
    """Parse `text` with `convert`; refuse NaN, infinities and anything `accept` rejects, naming the range."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
    return value


def positive_int(text: str) -> int:
    """An integer in [1, 2**63)."""
    return _number(text, int, lambda value: 1 <= value <= LARGEST_INT, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer in [0, 2**63)."""
    return _number(text, int, lambda value: 0 <= value <= LARGEST_INT, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, lambda value: value > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, lambda value: value >= 0, "a finite number >= 0")


def probability(text: str) -> float:
    """A number in [0, 1)."""
    return _number(text, float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def int_in_range(low: int, high: int):
    """An argparse type for integers in [low, high] (for sizes that would not fit in memory beyond `high`)."""

    def parse(text: str) -> int:
        return _number(text, int, lambda value: low <= value <= high, f"an integer in [{low}, {high}]")

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


# ---- one run per folder ----

def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check the run folder before any work: never start over a run that is there unless told to."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a folder")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"--out-dir {out_dir} cannot be created: {existing} is a file")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    if resume:
        if not (out_dir / "last.pt").is_file():
            raise UserError(f"cannot resume: {out_dir / 'last.pt'} does not exist")
        return
    held = [name for name in ("last.pt", "best.pt") if (out_dir / name).exists()]
    if held and not overwrite:
        raise UserError(f"{out_dir} already holds a run ({held[0]}); pass --resume to continue it, --out-dir DIR to "
                        "start a new run elsewhere, or --overwrite to replace it")
    if overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)


# ---- Ctrl-C at a step boundary ----

class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C aborts at once).

    The loop reads `requested` only at a step boundary: after the step is fully done (optimizer step, counters,
    logging, a validation that was due) and before anything random of the next step is drawn.
    """

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


# ---- checkpoints ----

def save_checkpoint(path: Path, state: dict) -> None:
    """Write to path.tmp, flush it to disk, then rename: a crash never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    try:  # make the rename itself durable (not possible on every system)
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def load_checkpoint(path: Path, what: str = "gru", required=("model", "config", "vocab", "tags")) -> dict:
    """Load tensors and plain values only (weights_only=True), on the CPU; anything else becomes one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (train one with: python gru/train.py)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated, not a pickle, a forbidden class: all unreadable
        raise UserError(f"{path} is not a readable {what} checkpoint ({unreadable_reason(path, error)})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise UserError(f"{path} is not a readable {what} checkpoint (it lacks the {what} fields)")
    return checkpoint


def unreadable_reason(path: Path, error: Exception) -> str:
    """A few words on why torch.load failed (never torch's advice to load untrusted files with weights_only=False)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(error, EOFError):
        return "the file ends early"
    if "weights only load failed" in str(error).lower():
        return "it holds something other than tensors and plain values"
    first_sentence = str(error).splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
    return first_sentence[:100]


def changed_setting(saved: dict, current: dict, names) -> str | None:
    """The first setting of `names` that differs between a saved run and this one, as one sentence."""
    for name in names:
        if name in saved and name in current and saved[name] != current[name]:
            return (f"--{name.replace('_', '-')} was {saved[name]} in the saved run and is {current[name]} now; "
                    "a resumed run keeps its settings (start a new run with --out-dir)")
    return None
