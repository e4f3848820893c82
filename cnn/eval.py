"""Evaluate a trained CNN on the 10,000 MNIST test digits and draw what it learned: python cnn/eval.py."""

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn.mnist import PIXEL_MEAN, PIXEL_STD, MnistError, load_split  # noqa: E402
from cnn.model import CNNConfig, build_model  # noqa: E402
from cnn.runs import RunError, non_negative_int, pick_device  # noqa: E402
from cnn.train import evaluate, load_run_checkpoint  # noqa: E402
from data import DataError  # noqa: E402


def parse_arguments(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="runs/cnn/best.pt", help="checkpoint written by train.py")
    parser.add_argument("--figures-dir", default=None, help="where the PNGs go (default: the checkpoint's folder)")
    parser.add_argument("--test-images", type=non_negative_int, default=0,
                        help="use only the first N test images (0: all 10,000)")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files (default: data helper)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    arguments = parser.parse_args(argv)
    figures = arguments.figures_dir
    if figures is not None and Path(figures).exists() and not Path(figures).is_dir():
        parser.error(f"--figures-dir {figures} is a file, not a folder")
    return arguments


def load_model(path, device):
    """Rebuild the network a checkpoint describes and load its weights."""
    checkpoint = load_run_checkpoint(Path(path))
    settings = checkpoint["run_settings"]
    try:
        model = build_model(CNNConfig(**settings["config"]), settings["impl"]).to(device)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise RunError(f"{path} does not fit the network it describes: {str(error).splitlines()[0]}") from None
    return model.eval(), settings


def show_digits(images, titles, path, columns=10):
    """A grid of digits with a title above each."""
    rows = max(1, (len(images) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow((image[0] * PIXEL_STD + PIXEL_MEAN).cpu(), cmap="gray_r", vmin=0, vmax=1)
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def show_maps(maps, path, title, columns=8, signed=False):
    """A grid of 2-D maps, each on its own colour scale; signed: red > 0, blue < 0, white = 0 (for filters)."""
    rows = (maps.shape[0] + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.0 + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, single_map in zip(axes.flat, maps.cpu()):
        if signed:
            limit = single_map.abs().max().item()
            axis.imshow(single_map, cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            axis.imshow(single_map, cmap="viridis")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def show_confusion(confusion, path):
    """The 10 x 10 confusion matrix, counts written in each cell."""
    figure, axis = plt.subplots(figsize=(6, 5.4))
    axis.imshow(torch.log1p(confusion.float()), cmap="Blues")
    for true in range(10):
        for predicted in range(10):
            count = confusion[true, predicted].item()
            axis.text(predicted, true, str(count), ha="center", va="center", fontsize=7,
                      color="white" if true == predicted else "black")
    axis.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title="test confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    """Evaluate, draw the figures, print the metrics."""
    arguments = parse_arguments(argv)
    try:
        device = pick_device(arguments.device)
        model, settings = load_model(arguments.checkpoint, device)
        images, labels = load_split("test", arguments.data_dir, arguments.test_images)
    except (RunError, DataError, MnistError, ValueError) as error:
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")
    images, labels = images.to(device), labels.to(device)
    test_loss, test_accuracy = evaluate(model, images, labels)
    with torch.no_grad():
        predictions = torch.cat([model(images[s : s + 1000]).argmax(dim=1) for s in range(0, len(images), 1000)])
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels.cpu(), predictions.cpu()), torch.ones(len(labels), dtype=torch.long), accumulate=True)

    figures = Path(arguments.figures_dir or Path(arguments.checkpoint).parent)
    figures.mkdir(parents=True, exist_ok=True)
    show_confusion(confusion, figures / "confusion.png")
    show_digits(images[:40], [f"pred {p}" for p in predictions[:40].tolist()], figures / "predictions.png")
    wrong = (predictions != labels).nonzero().flatten()[:40]
    show_digits(images[wrong], [f"{p} (true {t})" for p, t in zip(predictions[wrong].tolist(), labels[wrong].tolist())],
                figures / "misclassified.png")
    show_maps(model.conv1.weight.detach()[:, 0], figures / "filters.png", "first-layer 5x5 filters", signed=True)
    with torch.no_grad():
        block1, block2 = model.features(images[:1])  # (1, 32, 14, 14), (1, 64, 7, 7)
    show_maps(block1[0], figures / "feature_maps_block1.png", f"block 1 feature maps of a {labels[0].item()}")
    show_maps(block2[0], figures / "feature_maps_block2.png", f"block 2 feature maps of a {labels[0].item()}")

    metrics = {"test_accuracy": test_accuracy, "test_loss": test_loss, "test_images": len(labels),
               "misclassified": int((predictions != labels).sum().item()), "impl": settings["impl"],
               "checkpoint": str(arguments.checkpoint)}
    if arguments.json:
        print(json.dumps(metrics))
    else:
        print(f"test accuracy {100 * test_accuracy:.2f}%  test loss {test_loss:.4f}  "
              f"({metrics['misclassified']} of {len(labels)} wrong); figures in {figures}")


if __name__ == "__main__":
    main()
