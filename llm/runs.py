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

# The files a training run writes into its --out-dir (--overwrite removes exactly these; the data folder stays).
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "loss.png",
             "results.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, from another run); printed as one line."""


# ---- argparse types: each states its range and refuses NaN and infinity ----

def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
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


def probability(text: str) -> float:
    """A number in [0, 1) (dropout, AdamW's beta2)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a share of something, such as the final learning rate over the peak)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, such as 128,512,1024."""
    return [positive_int(part.strip()) for part in text.split(",")]


# ---- one run per folder ----

def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse to start a new run over an existing one unless asked; --overwrite clears that run's files.

    Called before any work. `remove=False` only checks: the caller then calls remove_run_files once the new run
    is sure to start (so a run that fails on a bad setting replaces nothing).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"--out-dir {out_dir} is a file, not a folder")
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    if resume:
        if not (out_dir / "last.pt").is_file():
            raise CheckpointError(f"--resume: {out_dir / 'last.pt'} does not exist")
        return
    held = [name for name in ("last.pt", "best.pt") if (out_dir / name).exists()]
    if held and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a run ({held[0]}); pass --resume to continue it, "
                              f"--out-dir DIR to start a new run elsewhere, or --overwrite to replace it")
    if remove:
        remove_run_files(out_dir)


def remove_run_files(out_dir: Path) -> None:
    """Delete the files a run writes (checkpoints, metrics, plots) and nothing else."""
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


def load_checkpoint(path: Path, what: str = "llm", required=("model", "config")) -> dict:
    """Load tensors only (weights_only=True), on the CPU; anything else becomes one readable line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
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
