"""Run handling: range-checked flags, the device, one run per folder, Ctrl-C then --resume, safe checkpoints.

This file is copied byte for byte into every chapter (a test fails when a copy differs), so that a reader who has
learnt one chapter's run handling knows them all, and a chapter still imports nothing from another. It holds
nothing chapter-specific: each chapter passes in its own file names, checkpoint fields and settings.

    argparse types      positive_int, non_negative_int, seed_int, int_in_range, positive_int_list,
                        positive_float, non_negative_float, finite_float, probability, fraction
    errors              RunError (printed as one line), CheckpointError (a RunError about a checkpoint)
    device              pick_device: --device auto picks CUDA, then MPS, then the CPU
    run folder          check_run_folder (before any work), remove_run_files (--overwrite)
    Ctrl-C              StopFlag (stop at a step boundary), EXIT_INTERRUPTED (the exit status afterwards)
    checkpoints         save_checkpoint and load_checkpoint, write_text_atomically (metrics files),
                        rng_states and restore_rng_states, refuse_changed_settings, warn_if_threads_changed
"""

import argparse
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

LARGEST_INT = 2**63 - 1  # what a torch int64 can hold: no count or size of a run goes beyond it
EXIT_INTERRUPTED = 130  # the shell's exit status for a program stopped by Ctrl-C (128 + SIGINT)


class RunError(ValueError):
    """A problem the user can fix (a bad setting, a run folder in the way, no device): printed as one line."""


class CheckpointError(RunError):
    """A checkpoint that cannot be used (missing, corrupt, from another run or model): printed as one line."""


# ---- argparse types: each states its range and refuses NaN and infinity ----

def _number(text: str, convert, accept, description: str):
    """Parse `text` with `convert`; refuse NaN, infinities and anything `accept` rejects, naming the range."""
    try:
        value = convert(text)
    except (ValueError, OverflowError):
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


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**32) (what numpy's and torch's generators all accept)."""
    return _number(text, int, lambda value: 0 <= value < 2**32, "an integer in [0, 2**32)")


def int_in_range(low: int, high: int):
    """An argparse type for integers in [low, high] (sizes that mean nothing, or do not fit in memory, outside it)."""

    def parse(text: str) -> int:
        return _number(text, int, lambda value: low <= value <= high, f"an integer in [{low}, {high}]")

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, such as 128,512,1024."""
    return [positive_int(part.strip()) for part in text.split(",")]


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, lambda value: value > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, lambda value: value >= 0, "a finite number >= 0")


def finite_float(text: str) -> float:
    """Any finite number (a starting bias may be negative)."""
    return _number(text, float, lambda value: True, "a finite number")


def probability(text: str) -> float:
    """A number in [0, 1) (dropout, momentum, label smoothing, the decay of a moving average)."""
    return _number(text, float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def fraction(text: str) -> float:
    """A number in [0, 1] (a share of something, such as the final learning rate over the peak)."""
    return _number(text, float, lambda value: 0 <= value <= 1, "a number in [0, 1]")


# ---- the device ----

def pick_device(name: str) -> torch.device:
    """--device auto picks CUDA, then MPS, then the CPU; cpu, cuda, cuda:N or mps is taken as asked, if it is there."""
    mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not mps_available:
        raise RunError(f"--device {name} asked for, but MPS is not available")
    return device


# ---- one run per folder ----

def check_run_folder(out_dir: Path, resume: bool, overwrite: bool, checkpoints=("last.pt", "best.pt"),
                     resume_from: str = "last.pt") -> None:
    """Refuse, before any work and changing nothing, to start a new run over an existing one unless asked.

    `checkpoints` are the names (or glob patterns) whose presence means the folder holds a run; `resume_from` is the
    checkpoint --resume needs. The caller removes the old run's files (remove_run_files) once it is sure to start.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out-dir {out_dir} is a file, not a folder")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    if not existing.is_dir():
        raise RunError(f"--out-dir {out_dir} cannot be created: {existing} is a file")
    if resume and overwrite:
        raise RunError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    if resume:
        if not out_dir.is_dir() or not any(out_dir.glob(resume_from)):
            raise RunError(f"--resume: {out_dir / resume_from} does not exist")
        return
    held = [path.name for pattern in checkpoints for path in sorted(out_dir.glob(pattern))] if out_dir.is_dir() else []
    if held and not overwrite:
        raise RunError(f"{out_dir} already holds a run ({held[0]}); pass --resume to continue it, --out-dir DIR to "
                       "start a new run elsewhere, or --overwrite to replace it")


def remove_run_files(out_dir: Path, run_files) -> None:
    """Delete the files a run writes (names or glob patterns: checkpoints, metrics, plots) and nothing else."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for pattern in run_files:
            for path in out_dir.glob(pattern):
                path.unlink(missing_ok=True)


# ---- Ctrl-C at a step boundary ----

class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C aborts at once).

    The loop reads `requested` only at a step boundary: after the step is fully done (optimizer step, counters,
    logging, a validation that was due) and before anything random of the next step is drawn. It then saves
    last.pt, says how to resume, and exits with EXIT_INTERRUPTED, so that a script can tell a stopped run from a
    finished one.
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


# ---- checkpoints: saving and restoring side by side ----

def _replace_atomically(path: Path, write) -> None:
    """Write to path.tmp with `write(handle)`, flush it to disk, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
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


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save `state` (tensors, dicts, lists, numbers and strings only) to path, atomically."""
    _replace_atomically(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, what: str, required=()) -> dict:
    """Load tensors and plain values only (weights_only=True), on the CPU; anything else is one CheckpointError line.

    `what` names the chapter in the message ("is not a readable rnn checkpoint"); `required` are the fields
    the caller needs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it is not a file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about some pickle protocols before failing
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated, not a pickle, a forbidden class: all unreadable
        raise CheckpointError(f"{path} is not a readable {what} checkpoint ({unreadable_reason(path, error)})") \
            from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it holds no dictionary of fields)")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it lacks {', '.join(missing)})")
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


def write_text_atomically(path: Path, text: str) -> None:
    """Replace a text file (metrics.jsonl) the way a checkpoint is replaced: temporary file, fsync, rename."""
    _replace_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def rng_states() -> dict:
    """The random generators training draws from (dropout, shuffling), as CPU tensors: they load on any machine."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = [state.cpu() for state in torch.cuda.get_rng_state_all()]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state().cpu()
    return states


def restore_rng_states(states: dict) -> None:
    """Put back what rng_states() saved (each device's generator takes its CPU copy)."""
    torch.set_rng_state(states["cpu"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    if "mps" in states and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"].cpu())


def refuse_changed_settings(saved: dict, current: dict, names, labels: dict | None = None) -> None:
    """A resumed run keeps the settings that shape it: CheckpointError naming the first of `names` that changed.

    `labels` names a setting that is not a flag (world_size: "the process count"); lists show as flags take them.
    """
    for name in names:
        if name in saved and name in current and saved[name] != current[name]:
            flag = (labels or {}).get(name, "--" + name.replace("_", "-"))
            before, now = (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                           for value in (saved[name], current[name]))
            raise CheckpointError(f"{flag} was {before} in the saved run and is {now} now; "
                                  "a resumed run keeps its settings (start a new run with --out-dir)")


def warn_if_threads_changed(saved_threads: int | None) -> None:
    """One line on stderr when a resume runs on another CPU thread count than the saved run (checkpoints keep it
    under "threads"): the sums inside a matmul are split differently, so the resumed run is no longer bit-identical
    to an uninterrupted one (it still trains as well)."""
    threads = torch.get_num_threads()
    if saved_threads is not None and saved_threads != threads:
        print(f"warning: the saved run used {saved_threads} CPU threads and this one uses {threads}; a resume is "
              f"bit-identical to an uninterrupted run only at the same thread count (OMP_NUM_THREADS={saved_threads})",
              file=sys.stderr, flush=True)
