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

# The files a training run writes into its --out-dir (--overwrite removes exactly these, and nothing else there).
# The adding problem keeps one pair of checkpoints per model and length: adding-lstm-100-last.pt, ...-best.pt.
CHECKPOINT_PATTERNS = ("last.pt", "best.pt", "adding-*-last.pt", "adding-*-best.pt")
RUN_FILES = (*CHECKPOINT_PATTERNS, *(pattern + ".tmp" for pattern in CHECKPOINT_PATTERNS), "metrics.jsonl",
             "metrics.jsonl.tmp", "summary.json", "curves.png", "adding.png")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, corrupt, from another run); printed as one line."""


# ---- argparse types: each states its range and refuses NaN and infinity ----

def _number(text: str, kind):
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value



def int_in_range(low: int, high: int):
    """An argparse type for integers in [low, high]."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse

def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**32)."""
    value = _number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a starting bias may be negative)."""
    return _number(text, float)


def probability(text: str) -> float:
    """A number in [0, 1) (dropout)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


# ---- one run per folder ----

def held_checkpoints(out_dir: Path) -> list[str]:
    """The names of the checkpoints a run left in out_dir: last.pt, best.pt, adding-*-last.pt, adding-*-best.pt."""
    if not out_dir.is_dir():
        return []
    return sorted({path.name for pattern in CHECKPOINT_PATTERNS for path in out_dir.glob(pattern)},
                  key=lambda name: (not name.endswith("last.pt"), name))


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool, resume_from: str = "last.pt") -> None:
    """Refuse to start a new run over an existing one unless asked; --overwrite clears that run's files.

    Called before any work. `resume_from` is the checkpoint --resume needs (a pattern: the adding problem resumes
    from any adding-*-last.pt and trains the models that have none).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"--out-dir {out_dir} is a file, not a folder")
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    if resume:
        if not out_dir.is_dir() or not any(out_dir.glob(resume_from)):
            raise CheckpointError(f"--resume: {out_dir / resume_from} does not exist")
        return
    held = held_checkpoints(out_dir)
    if held and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a run ({held[0]}); pass --resume to continue it, "
                              f"--out-dir DIR to start a new run elsewhere, or --overwrite to replace it")
    if overwrite and out_dir.is_dir():
        for pattern in RUN_FILES:
            for path in out_dir.glob(pattern):
                path.unlink(missing_ok=True)


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


def load_checkpoint(path: Path, what: str = "lstm", required=("model", "config")) -> dict:
    """Load tensors only (weights_only=True), on the CPU; anything else becomes one readable line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated, not a pickle, a forbidden class: all unreadable
        reason = unreadable_reason(path, error)
        raise CheckpointError(f"{path} is not a readable {what} checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it lacks the {what} fields)")
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


def changed_setting(saved: dict, current: dict, names, labels: dict | None = None) -> str | None:
    """The first setting of `names` that differs between a saved run and this one, as one sentence."""
    for name in names:
        if name in saved and name in current and saved[name] != current[name]:
            flag = (labels or {}).get(name, "--" + name.replace("_", "-"))
            return (f"{flag} was {saved[name]} in the saved run and is {current[name]} now; "
                    f"a resumed run keeps its settings (start a new run with --out-dir)")
    return None
