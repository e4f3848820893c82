"""Checkpoints: written atomically, read back on the CPU with weights_only=True, checked before use."""

import os
import pickle
import warnings
from pathlib import Path

import torch

from rnn.model import ClassifierConfig, NameClassifier

# What every rnn checkpoint holds (best.pt and last.pt alike); --resume needs RESUME_KEYS as well.
CHECKPOINT_KEYS = ("model", "model_config", "train_arguments", "alphabet", "languages", "epoch")
RESUME_KEYS = ("optimizer", "schedule", "rng_state", "history", "best_val_accuracy")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of this chapter's."""


def save_checkpoint(path, state):
    """torch.save to `path`.tmp, flushed to disk, then renamed over `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder):
    """fsync a folder so that a rename inside it survives a power cut (where the system allows it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def unreadable_reason(path, exception):
    """One short line on why torch.load failed, without torch's advice to load untrusted pickles."""
    if path.stat().st_size == 0:
        return "the file is empty"
    message = str(exception).strip()
    if isinstance(exception, pickle.UnpicklingError) or "weights" in message.lower():
        return "it holds something other than tensors, numbers and strings"
    first_line = message.splitlines()[0].split(". ")[0] if message else ""
    return f"{type(exception).__name__}: {first_line[:120]}" if first_line else type(exception).__name__


def load_checkpoint(path, what="rnn", required=CHECKPOINT_KEYS):
    """The checkpoint's dict, loaded on the CPU; CheckpointError with one line if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about some pickle protocols before failing
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exception:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable {what} checkpoint ({unreadable_reason(path, exception)})") \
            from None
    if not isinstance(state, dict) or state.get("chapter") != what:
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it was not written by {what}/train.py)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a readable {what} checkpoint (it lacks {', '.join(missing)})")
    return state


def model_from_checkpoint(state, device, impl=None):
    """Rebuild the NameClassifier stored in a checkpoint (optionally with the other --impl) on `device`."""
    try:
        config = ClassifierConfig(**state["model_config"])
        if impl is not None:
            config.impl = impl
        model = NameClassifier(config)
        model.load_state_dict(state["model"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as exception:
        first_line = (str(exception).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"the checkpoint's weights do not fit its config ({first_line})") from None
    return model.to(device)
