"""Train the character RNN to tell a surname's language: `python rnn/train.py` reproduces the README's table."""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataError  # noqa: E402
from rnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from rnn.metrics import classification_metrics, predict_probabilities  # noqa: E402
from rnn.model import ClassifierConfig, NameClassifier, clip_gradient_norm  # noqa: E402
from rnn.names import Alphabet, class_counts, encode_split, load_pairs, stratified_split  # noqa: E402

# Arguments that must match when resuming (the rest, e.g. --epochs or --device, may change).
FIXED_ON_RESUME = ("impl", "hidden_size", "embedding_size", "num_layers", "bidirectional", "seed", "split_seed",
                   "limit", "batch_size", "learning_rate", "weight_decay", "dropout", "label_smoothing")


def parse_arguments(argv=None):
    """The command line; every default is the configuration of the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten",
                        help="the hand-written RNN with its own BPTT, or torch.nn.RNN")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training names")
    parser.add_argument("--batch-size", type=int, default=64, help="names per mini-batch")
    parser.add_argument("--hidden-size", type=int, default=256, help="size of the hidden state h_t")
    parser.add_argument("--embedding-size", type=int, default=64, help="size of each character's embedding x_t")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked RNN layers")
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                        help="also read each name right to left")
    parser.add_argument("--dropout", type=float, default=0.3,
                        help="dropout on embeddings, between layers and before the head")
    parser.add_argument("--learning-rate", type=float, default=2e-3,
                        help="peak AdamW learning rate (cosine decay to 0)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    parser.add_argument("--clip", type=float, default=1.0, help="clip the gradient's global L2 norm to this (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, dropout and batch order")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split")
    parser.add_argument("--limit", type=int, default=0, help="use only this many training names (0: all; for tests)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/rnn", help="folder for checkpoints, metrics.jsonl and plots")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    arguments = parser.parse_args(argv)
    positive = ("epochs", "batch_size", "hidden_size", "embedding_size", "num_layers", "learning_rate")
    for name in positive:
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= arguments.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if arguments.limit < 0 or arguments.clip < 0 or arguments.weight_decay < 0:
        parser.error("--limit, --clip and --weight-decay must not be negative")
    return arguments


def pick_device(name):
    """Resolve --device: auto picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps but MPS is not available")
    return torch.device(name)


def prepare_data(split_seed, limit=0):
    """Splits, alphabet (from the training names only) and languages; prints the class counts."""
    splits = stratified_split(load_pairs(), split_seed)
    if limit:
        generator = torch.Generator().manual_seed(split_seed)
        keep = torch.randperm(len(splits["train"]), generator=generator)[:limit].sort().values
        splits["train"] = [splits["train"][i] for i in keep.tolist()]
    languages = sorted(class_counts(splits["train"] + splits["validation"] + splits["test"]))
    alphabet = Alphabet("".join(name for name, _ in splits["train"]))
    return splits, alphabet, languages


def print_class_counts(splits, languages):
    """A table of names per language and split."""
    counts = {split: class_counts(pairs) for split, pairs in splits.items()}
    print(f"{'language':<12}{'train':>7}{'val':>6}{'test':>6}")
    for language in languages:
        print(f"{language:<12}" + "".join(f"{counts[s].get(language, 0):>{w}}" for s, w in
                                          (("train", 7), ("validation", 6), ("test", 6))))
    print(f"{'total':<12}{len(splits['train']):>7}{len(splits['validation']):>6}{len(splits['test']):>6}")


def plot_curves(history, path):
    """Training loss and validation accuracy / macro-F1 per epoch, as a PNG."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], label="validation")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_axis.legend()
    score_axis.plot(epochs, [row["val_accuracy"] for row in history], label="val accuracy")
    score_axis.plot(epochs, [row["val_macro_f1"] for row in history], label="val macro-F1")
    score_axis.set(xlabel="epoch", title="validation")
    score_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def train(arguments):
    """The whole run: data, model, epochs with validation-based model selection, final test score."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir)
    splits, alphabet, languages = prepare_data(arguments.split_seed, arguments.limit)
    print_class_counts(splits, languages)
    train_ids, train_lengths, train_labels = encode_split(splits["train"], alphabet, languages)
    val_ids, val_lengths, val_labels = encode_split(splits["validation"], alphabet, languages)

    torch.manual_seed(arguments.seed)
    config = ClassifierConfig(len(alphabet), len(languages), arguments.embedding_size, arguments.hidden_size,
                              arguments.num_layers, arguments.bidirectional, arguments.dropout, arguments.impl)
    model = NameClassifier(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=arguments.learning_rate, weight_decay=arguments.weight_decay)
    batches_per_epoch = math.ceil(len(train_labels) / arguments.batch_size)
    total_steps = arguments.epochs * batches_per_epoch
    # Cosine decay of the learning rate from its peak to 0 over the whole run.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    start_epoch, best_accuracy, history = 0, -1.0, []
    if arguments.resume:
        state = load_checkpoint(out_dir / "last.pt", device)
        previous = state["train_arguments"]
        changed = [name for name in FIXED_ON_RESUME if previous.get(name) != getattr(arguments, name)]
        if changed:
            raise CheckpointError(f"cannot resume: --{changed[0].replace('_', '-')} differs from the checkpoint's")
        model.load_state_dict(model_from_checkpoint(state, device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, best_accuracy, history = state["epoch"], state["best_val_accuracy"], state["history"]
        torch.set_rng_state(state["rng_state"])
        print(f"resumed from {out_dir / 'last.pt'} after epoch {start_epoch}")
    print(f"{arguments.impl} RNN, {sum(p.numel() for p in model.parameters()):,} parameters, device {device}")

    def checkpoint_state(epoch):
        """Everything --resume and eval.py need, as tensors, dicts, lists, numbers and strings."""
        return {"chapter": "rnn", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "model_config": config.to_dict(),
                "train_arguments": vars(arguments), "alphabet": alphabet.characters, "languages": languages,
                "epoch": epoch, "best_val_accuracy": best_accuracy, "history": history,
                "rng_state": torch.get_rng_state()}

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out_dir / "metrics.jsonl", "a" if arguments.resume else "w")
    epoch = start_epoch
    started = time.time()
    try:
        for epoch in range(start_epoch + 1, arguments.epochs + 1):
            model.train()
            order = torch.randperm(len(train_labels))
            total_loss, seen = 0.0, 0
            progress = tqdm(range(batches_per_epoch), desc=f"epoch {epoch}", leave=False, disable=arguments.no_progress)
            for batch in progress:
                indices = order[batch * arguments.batch_size:(batch + 1) * arguments.batch_size]
                lengths = train_lengths[indices]  # (B,)
                character_ids = train_ids[indices, : int(lengths.max())].to(device)  # (B, T)
                labels = train_labels[indices].to(device)  # (B,)
                logits = model(character_ids, lengths.to(device))  # (B, C)
                loss = F.cross_entropy(logits, labels, label_smoothing=arguments.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if arguments.clip > 0:
                    clip_gradient_norm(model.parameters(), arguments.clip)
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(indices)
                seen += len(indices)
                progress.set_postfix(loss=f"{total_loss / seen:.3f}")
            probabilities = predict_probabilities(model, val_ids, val_lengths, device)
            scores = classification_metrics(val_labels, probabilities)
            val_loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), val_labels).item()
            row = {"epoch": epoch, "train_loss": total_loss / seen, "val_loss": val_loss,
                   "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                   "seconds": round(time.time() - started, 1)}
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            improved = scores["accuracy"] > best_accuracy
            if improved:
                best_accuracy = scores["accuracy"]
                save_checkpoint(out_dir / "best.pt", checkpoint_state(epoch))
            save_checkpoint(out_dir / "last.pt", checkpoint_state(epoch))
            print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val acc {scores['accuracy']:.4f}  val macro-F1 {scores['macro_f1']:.4f}"
                  f"{'  (best)' if improved else ''}  {row['seconds']:.0f}s")
    except KeyboardInterrupt:
        save_checkpoint(out_dir / "interrupted.pt", checkpoint_state(epoch - 1))
        print(f"\ninterrupted: state after epoch {epoch - 1} saved to {out_dir / 'interrupted.pt'} "
              f"(last.pt holds the last finished epoch; --resume continues from it)", file=sys.stderr)
        metrics_file.close()
        raise SystemExit(130) from None
    metrics_file.close()
    if history:
        plot_curves(history, out_dir / "curves.png")
    best = load_checkpoint(out_dir / "best.pt", device)
    test_ids, test_lengths, test_labels = encode_split(splits["test"], alphabet, languages)
    scores = classification_metrics(test_labels, predict_probabilities(model_from_checkpoint(best, device),
                                                                        test_ids, test_lengths, device))
    print(f"best epoch {best['epoch']} (val acc {best['best_val_accuracy']:.4f}): test accuracy "
          f"{scores['accuracy']:.4f}, test macro-F1 {scores['macro_f1']:.4f}, {time.time() - started:.0f}s of training")


def main(argv=None):
    """Entry point: user errors end as one `error:` line on stderr."""
    arguments = parse_arguments(argv)
    try:
        train(arguments)
    except (DataError, CheckpointError, ValueError, OSError) as exception:
        print(f"error: {exception}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
