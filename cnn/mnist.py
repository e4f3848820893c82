"""MNIST from its raw IDX files: parse, normalise, split (README, "The data")."""

from pathlib import Path

import numpy as np
import torch

from data import fetch

PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081  # of the 60,000 training images, pixels scaled to [0, 1]
VALIDATION_SIZE = 5000  # the last 5,000 training images are held out for validation


class MnistError(ValueError):
    """A missing, truncated or corrupt IDX file."""


def read_idx(path):
    """Parse one IDX file: 2 zero bytes, a type byte (8 = uint8), a dimension count, big-endian sizes, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise MnistError(f"cannot read {path}: {error.strerror}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise MnistError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    dimension_count = raw[3]
    header_size = 4 + 4 * dimension_count
    if len(raw) < header_size:
        raise MnistError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimension_count))
    if len(raw) - header_size != int(np.prod(shape)):
        raise MnistError(f"{path} holds {len(raw) - header_size} data bytes, but its header promises shape {shape}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy())


def normalise(images):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) with the training set's mean 0 and std 1."""
    return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def load_split(split, folder=None, limit=0):
    """Images (N, 1, 28, 28) and labels (N,) of 'train' (first 55,000), 'validation' (last 5,000) or 'test'.

    `limit` > 0 keeps only the first `limit` images of the split.
    """
    folder = Path(folder) if folder is not None else fetch("mnist")
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte")  # (N, 28, 28) uint8
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte").long()  # (N,)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise MnistError(f"{folder}: {prefix} images {tuple(images.shape)} do not match labels {tuple(labels.shape)}")
    if split == "train":
        images, labels = images[:-VALIDATION_SIZE], labels[:-VALIDATION_SIZE]
    elif split == "validation":
        images, labels = images[-VALIDATION_SIZE:], labels[-VALIDATION_SIZE:]
    if limit:
        images, labels = images[:limit], labels[:limit]
    return normalise(images), labels


def random_shift(images, max_shift, generator=None):
    """Augmentation: move each image by up to `max_shift` pixels in x and y, filling with the background."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    background = (0.0 - PIXEL_MEAN) / PIXEL_STD
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=background)  # (N, 1, H+2s, W+2s)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)  # per image, rows then columns
    rows = (shifts[0].view(-1, 1) + torch.arange(height)).to(images.device)  # (N, H)
    cols = (shifts[1].view(-1, 1) + torch.arange(width)).to(images.device)  # (N, W)
    batch_index = torch.arange(batch, device=images.device).view(-1, 1, 1)
    return padded[batch_index, 0, rows.unsqueeze(2), cols.unsqueeze(1)].unsqueeze(1)  # (N, 1, H, W)
