"""Pictures of the sinusoidal positional encoding (eq. 5); needs no training.

    python transformer/figures.py                           # writes runs/transformer/positional_encoding.png
    python transformer/figures.py --out transformer/assets  # the README's copy
"""

import argparse
import sys
from pathlib import Path

import matplotlib
import torch

from transformer.model import sinusoidal_positional_encoding
from transformer.runs import int_in_range

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_positional_encoding(path: Path, max_len: int = 128, d_model: int = 256):
    """Three panels: the encoding as an image, a few dimensions as curves, and PE(p).PE(q) against |p - q|."""
    encoding = sinusoidal_positional_encoding(max_len, d_model)  # (T, d)
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    image = axes[0].imshow(encoding.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    axes[0].set_xlabel("position")
    axes[0].set_ylabel("dimension")
    axes[0].set_title("PE[position, dimension]")
    figure.colorbar(image, ax=axes[0])
    for dimension in [d for d in [0, 20, 40, 80, 160] if d < d_model]:
        axes[1].plot(encoding[:, dimension], label=f"dim {dimension}")
    axes[1].set_xlabel("position")
    axes[1].set_title("sin curves: lower dimensions turn faster")
    axes[1].legend(fontsize=7, loc="lower left")
    similarity = encoding @ encoding.T  # (T, T): PE(p) . PE(q)
    for anchor in [0, 32, 64]:
        distance = torch.arange(max_len) - anchor
        axes[2].plot(distance, similarity[anchor], label=f"p = {anchor}")
    axes[2].set_xlabel("q - p")
    axes[2].set_title("PE(p) . PE(q) depends only on q - p")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv=None):
    """Write the positional-encoding figure into the folder --out names."""
    parser = argparse.ArgumentParser(description="Draw the sinusoidal positional encoding.")
    parser.add_argument("--out", default="runs/transformer",
                        help="folder to write positional_encoding.png into (transformer/assets: the README's copy)")
    parser.add_argument("--d-model", type=int_in_range(2, 8192), default=256, help="width of the encoding (even)")
    args = parser.parse_args(argv)
    folder = Path(args.out)
    if args.d_model % 2:
        sys.exit(f"error: --d-model must be even, got {args.d_model}")
    if folder.suffix.lower() == ".png" or (folder.exists() and not folder.is_dir()):
        sys.exit(f"error: --out names a folder (the figure is written as DIR/positional_encoding.png), not {folder}")
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        sys.exit(f"error: --out {folder} cannot be created: {existing} is a file")
    path = folder / "positional_encoding.png"
    plot_positional_encoding(path, d_model=args.d_model)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
