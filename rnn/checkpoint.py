"""Checkpoints: written atomically, read back with weights_only=True, checked before use."""

import os
from pathlib import Path

import torch

from rnn.model import ClassifierConfig, NameClassifier


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of this chapter's."""


def save_checkpoint(path, state):
    """torch.save to a temporary file beside `path`, then rename over it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, device="cpu"):
    """The checkpoint's dict, or CheckpointError with a readable reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exception:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exception).__name__}") from None
    if not isinstance(state, dict) or state.get("chapter") != "rnn":
        raise CheckpointError(f"{path} is not an rnn name-classifier checkpoint")
    return state


def model_from_checkpoint(state, device, impl=None):
    """Rebuild the NameClassifier stored in a checkpoint (optionally with the other --impl) on `device`."""
    config = ClassifierConfig(**state["model_config"])
    if impl is not None:
        config.impl = impl
    model = NameClassifier(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exception:
        first_line = str(exception).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit its config: {first_line}") from None
    return model
