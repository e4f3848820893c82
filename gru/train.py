"""Train the BiGRU tagger on MSRA NER: length-bucketed batches, validation entity F1 each epoch, best/last checkpoints.

    python gru/train.py                       # the README's default run
    python gru/train.py --output softmax      # the same without the CRF
    python gru/train.py --impl torch          # torch.nn.GRU instead of the hand-written GRU
    python gru/train.py --backward autograd   # the hand-written GRU, differentiated by autograd
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data import DataError  # noqa: E402
from gru.corpus import TAGS, build_vocab, collate, load_msra, make_batches  # noqa: E402
from gru.model import Tagger, TaggerConfig  # noqa: E402
from gru.tagging import UserError, entity_scores, load_checkpoint, pick_device, predict, save_atomically  # noqa: E402

MODEL_KEYS = ("embedding_dim", "hidden_size", "num_layers", "dropout", "output", "impl", "backward")


def parse_args(argv=None):
    """The command line; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training sentences")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay to 5%%)")
    parser.add_argument("--clip", type=float, default=5.0, help="clip the gradient norm to this")
    parser.add_argument("--embedding-dim", type=int, default=128, help="size of a character embedding")
    parser.add_argument("--hidden-size", type=int, default=128, help="GRU state size per direction")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked BiGRU layers")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout on embeddings and GRU outputs")
    parser.add_argument("--output", choices=["crf", "softmax"], default="crf", help="output layer")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten", help="which GRU")
    parser.add_argument("--backward", choices=["handwritten", "autograd"], default="handwritten",
                        help="the hand-written GRU's backward: written out (GRULayerFunction) or autograd through "
                             "the same forward (ignored by --impl torch)")
    parser.add_argument("--min-count", type=int, default=2, help="rarer characters become <unk>")
    parser.add_argument("--validation-size", type=int, default=2500, help="sentences held out of train")
    parser.add_argument("--max-length", type=int, default=100, help="longer sentences are cut at punctuation")
    parser.add_argument("--limit-train", type=int, default=0, help="use only this many training sentences (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (init, split, batch order, dropout)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/gru", help="checkpoints, metrics.jsonl and curves go here")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="end after this many epochs, keeping the schedule of --epochs (continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if <out-dir> holds checkpoints")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "embedding_dim", "hidden_size", "num_layers", "max_length", "min_count"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout < 1 or args.lr <= 0 or args.limit_train < 0:
        raise UserError("--dropout must be in [0, 1), --lr positive and --limit-train not negative")
    return args


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation entity F1 per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    left.plot(epochs, [row["validation_loss"] for row in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss per character (nats)", title="loss")
    left.legend()
    right.plot(epochs, [row["validation_f1"] for row in history], "o-", color="C2")
    right.set(xlabel="epoch", ylabel="entity F1 (strict)", title="validation entity F1")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


@torch.no_grad()
def mean_loss(model, sentences, char_to_id, tag_to_id, device, batch_size=256) -> float:
    """Loss per character over a set of sentences, without dropout."""
    model.eval()
    total, characters = 0.0, 0
    for indices in make_batches(sentences, batch_size):
        char_ids, tag_ids, lengths = collate(sentences, indices, char_to_id, tag_to_id, device)
        total += model.loss(char_ids, tag_ids, lengths).item() * int(lengths.sum())
        characters += int(lengths.sum())
    return total / characters


def train(args) -> dict:
    """Train, validating each epoch; return the last metrics row."""
    device = pick_device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if not args.resume and not args.overwrite and (last_path.exists() or best_path.exists()):
        raise UserError(f"{out_dir} already holds checkpoints: pass --resume to continue or --overwrite to restart")
    torch.manual_seed(args.seed)
    train_set, validation_set = load_msra(args.validation_size, args.max_length, args.seed, log=tqdm.write)
    if args.limit_train:
        train_set = train_set[: args.limit_train]

    checkpoint = load_checkpoint(last_path, device) if args.resume else None
    if checkpoint is not None:
        vocab = checkpoint["vocab"]
        mismatched = [k for k in MODEL_KEYS if checkpoint["config"][k] != getattr(args, k)]
        if mismatched:
            saved = ", ".join(f"--{k.replace('_', '-')} {checkpoint['config'][k]}" for k in mismatched)
            raise UserError(f"{last_path} was trained with {saved}; pass the same flags to resume it")
    else:
        vocab = build_vocab(train_set, args.min_count)
    char_to_id = {char: i for i, char in enumerate(vocab)}
    tag_to_id = {tag: i for i, tag in enumerate(TAGS)}
    config = TaggerConfig(len(vocab), len(TAGS), **{k: getattr(args, k) for k in MODEL_KEYS})
    model = Tagger(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, best_f1, history = 1, -1.0, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, best_f1, history = checkpoint["epoch"] + 1, checkpoint["best_f1"], checkpoint["history"]
        generator.set_state(checkpoint["batch_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        tqdm.write(f"resumed from {last_path} after epoch {checkpoint['epoch']}")
    tqdm.write(f"{len(train_set)} train / {len(validation_set)} validation sentences, vocabulary {len(vocab)}, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.impl} GRU, {args.output}, {device}")

    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    def learning_rate(step: int) -> float:
        """Cosine decay from --lr to 5% of it over the whole run."""
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))

    def snapshot(epoch: int) -> dict:
        """Everything --resume needs, only tensors, dicts, lists, numbers and strings."""
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "vocab": vocab, "tags": TAGS, "epoch": epoch, "best_f1": best_f1, "history": history,
            "batch_rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "args": vars(args),
        }

    def run_epoch(epoch: int, batches) -> dict:
        """One pass over the training batches, then validation: the epoch's metrics row."""
        model.train()
        started, total_loss, characters = time.time(), 0.0, 0
        progress = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", leave=False, mininterval=2)
        for step, indices in enumerate(progress, (epoch - 1) * steps_per_epoch):
            char_ids, tag_ids, lengths = collate(train_set, indices, char_to_id, tag_to_id, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            loss = model.loss(char_ids, tag_ids, lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            total_loss += loss.item() * int(lengths.sum())
            characters += int(lengths.sum())
            progress.set_postfix(loss=f"{total_loss / characters:.4f}")
        train_seconds = time.time() - started
        gold = [tags for _, tags in validation_set]
        scores = entity_scores(gold, predict(model, validation_set, char_to_id, TAGS, device))
        return {"epoch": epoch, "train_loss": total_loss / characters,
                "validation_loss": mean_loss(model, validation_set, char_to_id, tag_to_id, device),
                "validation_f1": scores["f1"], "validation_precision": scores["precision"],
                "validation_recall": scores["recall"], "train_seconds": round(train_seconds, 1),
                "chars_per_second": round(characters / train_seconds)}

    row = history[-1] if history else {}
    for epoch in range(start_epoch, args.epochs + 1):
        epoch_rng = (generator.get_state(), torch.get_rng_state())  # what --resume needs to redo this epoch
        try:
            row = run_epoch(epoch, make_batches(train_set, args.batch_size, generator))
            history.append(row)
            if row["validation_f1"] > best_f1:
                best_f1 = row["validation_f1"]
                save_atomically(snapshot(epoch), best_path)
            save_atomically(snapshot(epoch), last_path)
        except KeyboardInterrupt:
            # keep the weights so far, but mark the epoch unfinished so --resume runs it again
            history = [past for past in history if past["epoch"] < epoch]
            state = snapshot(epoch - 1)
            state["batch_rng"], state["torch_rng"] = epoch_rng
            save_atomically(state, last_path)
            tqdm.write(f"interrupted: saved {last_path}; continue with --resume")
            sys.exit(130)
        metrics_path.write_text("".join(json.dumps(past) + "\n" for past in history))  # one row per finished epoch
        tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss {row['validation_loss']:.4f}, "
                   f"entity F1 {row['validation_f1']:.4f} ({row['train_seconds']:.0f} s, {row['chars_per_second']} "
                   "chars/s)")
        plot_curves(history, out_dir / "curves.png")
        if epoch == args.stop_after:
            tqdm.write(f"stopped after epoch {epoch} as asked; continue with --resume")
            break
    tqdm.write(f"best validation entity F1 {best_f1:.4f}; checkpoints in {out_dir}")
    return row


def main(argv=None) -> int:
    """Run train() and turn user errors into one line on stderr."""
    try:
        train(parse_args(argv))
    except (UserError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
