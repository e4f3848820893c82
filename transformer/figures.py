"""Pictures of the sinusoidal positional encoding (eq. 5); needs no training.

    python transformer/figures.py                           # writes runs/transformer/positional_encoding.png
    python transformer/figures.py --out transformer/assets  # the README's copy
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib
import torch

from transformer.model import sinusoidal_positional_encoding
from transformer.runs import int_in_range

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_positional_encoding(path: Path, max_len: int = 128, d_model: int = 256):
    """Three parts: the encoding as an image; a few dimensions as curves, one small panel each, so that every
    curve can be read; and PE(p).PE(q) against q - p for three anchors p."""
    encoding = sinusoidal_positional_encoding(max_len, d_model)  # (T, d)
    dimensions = [d for d in [0, 20, 40, 80] if d < d_model]
    figure = plt.figure(figsize=(14, 4.2))
    grid = figure.add_gridspec(len(dimensions), 3, width_ratios=[1.1, 1, 1], hspace=0.15, wspace=0.4)
    image_axis = figure.add_subplot(grid[:, 0])
    image = image_axis.imshow(encoding.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    image_axis.set_xlabel("position")
    image_axis.set_ylabel("dimension")
    image_axis.set_title("PE[position, dimension]")
    figure.colorbar(image, ax=image_axis)
    # dimension 2i is sin(w_i p) with w_i = 10000^(-2i/d): the period 2 pi / w_i grows with i
    for row, dimension in enumerate(dimensions):
        axis = figure.add_subplot(grid[row, 1])
        period = 2 * math.pi * 10000 ** (dimension / d_model)
        axis.plot(encoding[:, dimension], color=f"C{row}")
        axis.set_ylim(-1.2, 1.2)
        axis.set_yticks([-1, 1])
        axis.text(1.01, 0.5, f"dim {dimension}\nperiod {period:.0f}", transform=axis.transAxes, fontsize=7,
                  va="center")
        if row == 0:
            axis.set_title(r"$\sin(\omega_i\,p)$: higher dimensions turn more slowly")
        if row < len(dimensions) - 1:
            axis.set_xticklabels([])
        else:
            axis.set_xlabel("position")
    similarity = encoding @ encoding.T  # (T, T): PE(p) . PE(q)
    similarity_axis = figure.add_subplot(grid[:, 2])
    for anchor in [0, 32, 64]:
        distance = torch.arange(max_len) - anchor
        similarity_axis.plot(distance, similarity[anchor], label=f"p = {anchor}")
    similarity_axis.set_xlabel("q - p")
    similarity_axis.set_ylabel("PE(p) . PE(q)")
    similarity_axis.set_title("a function of q - p only: d/2 at 0,\nthen a fast fall and ripples around 55-60",
                              fontsize=10)
    similarity_axis.legend(fontsize=7)
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.88)
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
