"""Score a trained name classifier on the test split, draw its confusion matrix, or name the language of surnames."""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data import DataError  # noqa: E402
from rnn.metrics import classification_metrics, predict_probabilities  # noqa: E402
from rnn.names import Alphabet, encode_split, load_pairs, make_batch, stratified_split  # noqa: E402
from rnn.runs import RunError, pick_device  # noqa: E402
from rnn.train import load_run_checkpoint, model_from_checkpoint  # noqa: E402


def parse_arguments(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="runs/rnn/best.pt", help="checkpoint written by rnn/train.py")
    parser.add_argument("--predict", nargs="+", metavar="NAME", help="print the top-3 languages of these surnames")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default=None,
                        help="run the checkpoint's weights in this RNN (default: the one it was trained with)")
    parser.add_argument("--json", action="store_true", help="print the test metrics as one JSON object")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default=None, help="folder for confusion.png (default: the checkpoint's folder)")
    return parser.parse_args(argv)


def predict_names(model, names, alphabet, languages, device):
    """Print the three likeliest languages of each name, with probabilities."""
    for name in names:
        if not name.strip():
            raise ValueError("cannot classify an empty name")
        unknown = alphabet.unknown_characters(name)
        if unknown:
            raise ValueError(f"{name!r} has characters the model never saw in training: {unknown!r}")
    character_ids, lengths = make_batch(names, alphabet)
    probabilities = predict_probabilities(model, character_ids, lengths, device)  # (N, C)
    for name, row in zip(names, probabilities):
        top = row.topk(3)
        guesses = ", ".join(f"{languages[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{name}: {guesses}")


def plot_confusion(confusion, languages, path):
    """Row-normalised confusion matrix (true language down, predicted across) as a PNG."""
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)  # (C, C)
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    image = axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(languages)), languages, rotation=90)
    axis.set_yticks(range(len(languages)), languages)
    axis.set(xlabel="predicted", ylabel="true", title="test confusion (row-normalised)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def evaluate(arguments):
    """Load the checkpoint, then either predict the given names or score the whole test split."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir) if arguments.out_dir else Path(arguments.checkpoint).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    state = load_run_checkpoint(arguments.checkpoint)
    model = model_from_checkpoint(state, device, arguments.impl)
    alphabet, languages = Alphabet(state["alphabet"]), state["languages"]
    if arguments.predict:
        predict_names(model, arguments.predict, alphabet, languages, device)
        return
    split_seed = state["train_arguments"]["split_seed"]
    test_pairs = stratified_split(load_pairs(), split_seed)["test"]
    character_ids, lengths, labels = encode_split(test_pairs, alphabet, languages)
    scores = classification_metrics(labels, predict_probabilities(model, character_ids, lengths, device))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(scores["confusion"], languages, out_dir / "confusion.png")
    majority = labels.bincount().max().item() / len(labels)
    metrics = {"test_accuracy": round(scores["accuracy"], 4), "macro_f1": round(scores["macro_f1"], 4),
               "majority_class_accuracy": round(majority, 4), "test_names": len(labels),
               "epoch": state["epoch"], "impl": model.config.impl}
    if arguments.json:
        print(json.dumps(metrics))
        return
    print(f"test accuracy {metrics['test_accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
          f"(majority class alone: {majority:.4f}; {len(labels)} test names; epoch {state['epoch']})")
    confusion = scores["confusion"]
    print(f"{'language':<12}{'names':>6}{'recall':>8}{'precision':>10}")
    for i, language in enumerate(languages):
        recall = confusion[i, i].item() / max(1, confusion[i].sum().item())
        precision = confusion[i, i].item() / max(1, confusion[:, i].sum().item())
        print(f"{language:<12}{confusion[i].sum().item():>6}{recall:>8.3f}{precision:>10.3f}")
    print(f"confusion matrix: {out_dir / 'confusion.png'}")


def main(argv=None):
    """Entry point: user errors end as one `error:` line on stderr."""
    arguments = parse_arguments(argv)
    try:
        with torch.no_grad():
            evaluate(arguments)
    except (DataError, RunError, ValueError, OSError) as exception:
        sys.exit(f"error: {exception}")


if __name__ == "__main__":
    main()
