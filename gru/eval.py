"""Score a trained tagger on the MSRA test set (entity-level, strict), or tag a sentence of your own.

    python gru/eval.py                                   # per-type P/R/F1, confusion table and picture of tags
    python gru/eval.py --json                            # the metrics as one JSON object
    python gru/eval.py --tag "中国人民银行行长在北京发表讲话"   # the entities found, as spans with types
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data import DataError  # noqa: E402
from gru.corpus import load_file  # noqa: E402
from gru.runs import RunError, load_checkpoint, non_negative_int, pick_device, positive_int  # noqa: E402
from gru.tagging import (  # noqa: E402
    entity_scores,
    predict,
    tag_text,
    tagger_from_checkpoint,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/gru/best.pt", help="checkpoint written by train.py")
    parser.add_argument("--tag", default=None, help="tag this text instead of scoring the test set")
    parser.add_argument("--json", action="store_true", help="print the test metrics as one JSON object")
    parser.add_argument("--max-length", type=positive_int, default=100, help="longer texts are cut at punctuation")
    parser.add_argument("--confusion-png", default=None,
                        help="where to draw the tag confusion matrix (default: confusion.png beside the checkpoint)")
    parser.add_argument("--limit", type=non_negative_int, default=0,
                        help="score only the first N test sentences (0: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return parser


def confusion_table(gold, predicted, tags) -> list[list[int]]:
    """counts[gold tag][predicted tag] over all characters."""
    index = {tag: i for i, tag in enumerate(tags)}
    counts = torch.zeros(len(tags), len(tags), dtype=torch.long)  # (K, K)
    for gold_tags, predicted_tags in zip(gold, predicted):
        for g, p in zip(gold_tags, predicted_tags):
            counts[index[g], index[p]] += 1
    return counts.tolist()


def print_confusion(counts, tags) -> None:
    """The confusion table as text: rows are gold tags, columns predicted tags."""
    width = max(7, *(len(str(c)) + 1 for row in counts for c in row))
    print("confusion of tags (rows: gold, columns: predicted)")
    print(" " * 7 + "".join(f"{tag:>{width}}" for tag in tags))
    for tag, row in zip(tags, counts):
        print(f"{tag:>7}" + "".join(f"{c:>{width}}" for c in row))


def draw_confusion(counts, tags, path: Path) -> None:
    """Row-normalised confusion matrix (what share of each gold tag went where), log colour scale."""
    matrix = torch.tensor(counts, dtype=torch.float)
    shares = matrix / matrix.sum(1, keepdim=True).clamp(min=1)  # (K, K)
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(shares.clamp(min=1e-4).log10(), cmap="viridis", vmin=-4, vmax=0)
    axes.set_xticks(range(len(tags)), tags, rotation=90)
    axes.set_yticks(range(len(tags)), tags)
    axes.set(xlabel="predicted tag", ylabel="gold tag", title="tag confusion (share of each gold tag, log10)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv=None) -> int:
    """Tag a text or score the test set; user errors become one line on stderr."""
    try:
        args = build_parser().parse_args(argv)
        device = pick_device(args.device)
        checkpoint = load_checkpoint(Path(args.checkpoint), "gru", ("model", "config", "vocab", "tags"))
        model = tagger_from_checkpoint(checkpoint, device)
        vocab, tags = checkpoint["vocab"], checkpoint["tags"]
        char_to_id = {char: i for i, char in enumerate(vocab)}
        if args.tag is not None:
            entities = tag_text(model, args.tag, char_to_id, tags, device, args.max_length)
            if args.json:
                print(json.dumps([{"start": s, "end": e, "type": k, "text": t} for s, e, k, t in entities],
                                 ensure_ascii=False))
                return 0
            for start, end, kind, surface in entities:
                print(f"[{start}:{end}] {kind} {surface}")
            if not entities:
                print("no entities found")
            return 0
        test_set = load_file("test", args.max_length, log=lambda message: None)
        if args.limit:
            test_set = test_set[: args.limit]
        gold = [sentence_tags for _, sentence_tags in test_set]
        predicted = predict(model, test_set, char_to_id, tags, device)
        scores = entity_scores(gold, predicted)
        correct = sum(g == p for gold_tags, pred in zip(gold, predicted) for g, p in zip(gold_tags, pred))
        scores["token_accuracy"] = correct / sum(len(t) for t in gold)
        scores["sentences"] = len(test_set)
        if args.json:
            print(json.dumps(scores))
            return 0
        print(f"MSRA test, {len(test_set)} sentences, entity-level (seqeval strict, IOBES)")
        print(f"{'type':>8} {'precision':>10} {'recall':>8} {'f1':>8} {'support':>8}")
        for kind, values in sorted(scores["per_type"].items()):
            print(f"{kind:>8} {values['precision']:>10.4f} {values['recall']:>8.4f} {values['f1-score']:>8.4f} "
                  f"{int(values['support']):>8}")
        print(f"{'overall':>8} {scores['precision']:>10.4f} {scores['recall']:>8.4f} {scores['f1']:>8.4f}")
        print(f"token accuracy {scores['token_accuracy']:.4f} (high even for a tagger that finds no entity)")
        counts = confusion_table(gold, predicted, tags)
        print_confusion(counts, tags)
        picture = Path(args.confusion_png) if args.confusion_png else Path(args.checkpoint).parent / "confusion.png"
        draw_confusion(counts, tags, picture)
        print(f"confusion matrix drawn to {picture}")
    except (RunError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
