"""Train the BiGRU tagger on MSRA NER: length-bucketed batches, validation entity F1 each epoch, best/last checkpoints.

    python gru/train.py                       # the README's default run
    python gru/train.py --quick               # the same model in about 5 minutes -> runs/gru-quick
    python gru/train.py --output softmax      # the same without the CRF
    python gru/train.py --impl torch          # torch.nn.GRU instead of the hand-written GRU
    python gru/train.py --backward autograd   # the hand-written GRU, differentiated by autograd

Ctrl-C stops at the end of the current step and saves last.pt; --resume continues exactly where it stopped.
A folder that holds a run needs --resume, a new --out-dir, or --overwrite.
"""

import argparse
import json
import math
import os
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
from gru.runs import (  # noqa: E402
    StopFlag,
    UserError,
    changed_setting,
    int_in_range,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    prepare_run_folder,
    probability,
    save_checkpoint,
)
from gru.tagging import entity_scores, pick_device, predict  # noqa: E402

MODEL_KEYS = ("embedding_dim", "hidden_size", "num_layers", "dropout", "output", "impl", "backward")
# Arguments that change the run and so must match when resuming (the rest, e.g. --device or --stop-after, may change).
FIXED_ON_RESUME = ("quick", "seed", "validation_size", "max_length", "min_count", "limit_train", "batch_size", "lr",
                   "epochs", "clip", *MODEL_KEYS)
# What --resume reads from last.pt besides the model's own fields.
RESUME_KEYS = ("model", "optimizer", "config", "vocab", "tags", "args", "epoch", "batch_in_epoch", "step", "best_f1",
               "history", "batch_rng", "torch_rng", "epoch_progress")
# --quick: the default model on a shorter schedule, a whole run (data, training, validation, and eval.py's test pass)
# in about 5 minutes on a 2-core CPU. These are only new defaults: a flag given beside --quick wins.
QUICK_PRESET = {"epochs": 2, "out_dir": "runs/gru-quick"}
SIZE = int_in_range(1, 4096)  # embedding and state sizes: beyond this the weights alone outgrow a laptop's memory


def build_parser() -> argparse.ArgumentParser:
    """The command line; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in QUICK_PRESET.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"a run of about 5 minutes on 2 CPU cores: the defaults become {preset}; a flag given "
                             f"beside --quick wins")
    parser.add_argument("--epochs", type=positive_int, default=10, help="passes over the training sentences")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sentences per batch")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak Adam learning rate (cosine decay to 5%%)")
    parser.add_argument("--clip", "--grad-clip", dest="clip", type=non_negative_float, default=5.0,
                        help="clip the gradient's global L2 norm to this (0: no clipping)")
    parser.add_argument("--embedding-dim", type=SIZE, default=128, help="size of a character embedding")
    parser.add_argument("--hidden-size", type=SIZE, default=128, help="GRU state size per direction")
    parser.add_argument("--num-layers", type=int_in_range(1, 16), default=1, help="stacked BiGRU layers")
    parser.add_argument("--dropout", type=probability, default=0.2, help="dropout on embeddings and GRU outputs")
    parser.add_argument("--output", choices=["crf", "softmax"], default="crf", help="output layer")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten", help="which GRU")
    parser.add_argument("--backward", choices=["handwritten", "autograd"], default="handwritten",
                        help="the hand-written GRU's backward: written out (GRULayerFunction) or autograd through "
                             "the same forward (ignored by --impl torch)")
    parser.add_argument("--min-count", type=positive_int, default=2, help="rarer characters become <unk>")
    parser.add_argument("--validation-size", type=positive_int, default=2500, help="sentences held out of train")
    parser.add_argument("--max-length", type=positive_int, default=100, help="longer sentences are cut at punctuation")
    parser.add_argument("--limit-train", type=non_negative_int, default=0,
                        help="use only this many training sentences (0: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed (init, split, batch order, dropout)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--threads", type=int_in_range(1, 1024), default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1; the README measures 1 "
                             "against 2)")
    parser.add_argument("--out-dir", default="runs/gru", help="checkpoints, metrics.jsonl and curves go here")
    parser.add_argument("--stop-after", type=non_negative_int, default=0,
                        help="end after this many epochs, keeping the schedule of --epochs (continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (argparse refuses an out-of-range value with its usage and exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # parse again with the preset as defaults, so that the flags given explicitly still win
        parser.set_defaults(**QUICK_PRESET)
        args = parser.parse_args(argv)
    return args


def resume_command(args) -> str:
    """The command that continues this run: --quick and every setting that differs from the defaults, and --resume."""
    defaults = parse_args(["--quick"] if args.quick else [])
    parts = ["python gru/train.py", f"--out-dir {args.out_dir}", "--resume"] + (["--quick"] if args.quick else [])
    for name in FIXED_ON_RESUME:
        value = getattr(args, name)
        if name != "quick" and value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


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


class NonFiniteLoss(Exception):
    """A training or validation loss that is NaN or infinite: the run stops before it writes anything."""


def train(args) -> dict:
    """Train, validating each epoch; return the last metrics row."""
    out_dir = Path(args.out_dir)
    prepare_run_folder(out_dir, args.resume, args.overwrite)
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    device = pick_device(args.device)
    checkpoint = load_checkpoint(last_path, "gru", RESUME_KEYS) if args.resume else None
    if checkpoint is not None:
        changed = changed_setting(checkpoint["args"], vars(args), FIXED_ON_RESUME)
        if changed:
            raise UserError(changed)
    torch.manual_seed(args.seed)
    train_set, validation_set = load_msra(args.validation_size, args.max_length, args.seed, log=tqdm.write)
    if args.limit_train:
        train_set = train_set[: args.limit_train]

    vocab = checkpoint["vocab"] if checkpoint is not None else build_vocab(train_set, args.min_count)
    char_to_id = {char: i for i, char in enumerate(vocab)}
    tag_to_id = {tag: i for i, tag in enumerate(TAGS)}
    config = TaggerConfig(len(vocab), len(TAGS), **{k: getattr(args, k) for k in MODEL_KEYS})
    model = Tagger(config)
    generator = torch.Generator().manual_seed(args.seed)  # batch order; its state at an epoch's start is saved
    # where training stands: finished epochs, batches done of the next one, steps done, that epoch's running sums
    epoch, batch_in_epoch, step, best_f1, history = 0, 0, 0, -1.0, []
    progress = {"loss_sum": 0.0, "characters": 0, "seconds": 0.0}
    if checkpoint is not None:  # loaded on the CPU: the random states stay there, the weights move below
        model.load_state_dict(checkpoint["model"])
        epoch, batch_in_epoch, step = checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]
        best_f1, history, progress = checkpoint["best_f1"], checkpoint["history"], checkpoint["epoch_progress"]
        generator.set_state(checkpoint["batch_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
        tqdm.write(f"resumed from {last_path} at step {step}: epoch {epoch} done, {batch_in_epoch} batches of the next")
    tqdm.write(f"{len(train_set)} train / {len(validation_set)} validation sentences, vocabulary {len(vocab)}, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.impl} GRU, {args.output}, {device}")
    out_dir.mkdir(parents=True, exist_ok=True)

    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    saved_step = step if checkpoint is not None else None  # the step last.pt holds

    def learning_rate(step: int) -> float:
        """Cosine decay from --lr to 5% of it over the whole run."""
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))

    def snapshot(epoch_start_rng: torch.Tensor) -> dict:
        """Everything --resume needs, only tensors, dicts, lists, numbers and strings.

        batch_rng is the batch-order generator at the start of the epoch in progress, so that --resume draws the
        same batches again and skips the `batch_in_epoch` already trained; torch_rng is the state after the last
        finished step (dropout).
        """
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "vocab": vocab, "tags": TAGS, "args": vars(args), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "step": step, "best_f1": best_f1, "history": history, "batch_rng": epoch_start_rng,
            "torch_rng": torch.get_rng_state(), "epoch_progress": dict(progress),
        }

    def save_last(epoch_start_rng: torch.Tensor) -> None:
        nonlocal saved_step
        save_checkpoint(last_path, snapshot(epoch_start_rng))
        saved_step = step

    def not_finite(what: str) -> NonFiniteLoss:
        kept = "no checkpoint was written yet" if saved_step is None else \
            f"{last_path.name} (step {saved_step}) holds the last good state"
        return NonFiniteLoss(f"the {what} is not finite at step {step + (what == 'training loss')}; "
                             f"stopped without saving: {kept}")

    def announce_stop(row: dict) -> dict:
        tqdm.write(f"stopped at step {step}; resume with: {resume_command(args)}")
        return row

    stop = StopFlag()
    row = history[-1] if history else {}
    try:
        while epoch < args.epochs:
            epoch_start_rng = generator.get_state()  # what --resume needs to draw this epoch's batches again
            batches = make_batches(train_set, args.batch_size, generator)
            model.train()
            started = time.time()
            with tqdm(total=len(batches), initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                      leave=False, mininterval=2) as bar:
                for indices in batches[batch_in_epoch:]:
                    char_ids, tag_ids, lengths = collate(train_set, indices, char_to_id, tag_to_id, device)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step)
                    loss = model.loss(char_ids, tag_ids, lengths)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise not_finite("training loss")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if args.clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                    optimizer.step()
                    # the step is done: counters and sums move with the weights, so a save here is consistent
                    step, batch_in_epoch = step + 1, batch_in_epoch + 1
                    progress["loss_sum"] += loss_value * int(lengths.sum())
                    progress["characters"] += int(lengths.sum())
                    bar.update()
                    bar.set_postfix(loss=f"{progress['loss_sum'] / progress['characters']:.4f}", refresh=False)
                    if stop.requested and batch_in_epoch < len(batches):  # the last step goes on to validation
                        progress["seconds"] += time.time() - started
                        save_last(epoch_start_rng)
                        return announce_stop(row)
            progress["seconds"] += time.time() - started
            # validation (a Ctrl-C in here lets it finish; the epoch's record and checkpoints are written first)
            gold = [tags for _, tags in validation_set]
            scores = entity_scores(gold, predict(model, validation_set, char_to_id, TAGS, device))
            validation_loss = mean_loss(model, validation_set, char_to_id, tag_to_id, device)
            if not math.isfinite(validation_loss):
                raise not_finite("validation loss")
            train_seconds = max(progress["seconds"], 1e-9)
            row = {"epoch": epoch + 1, "train_loss": progress["loss_sum"] / progress["characters"],
                   "validation_loss": validation_loss, "validation_f1": scores["f1"],
                   "validation_precision": scores["precision"], "validation_recall": scores["recall"],
                   "train_seconds": round(train_seconds, 1),
                   "chars_per_second": round(progress["characters"] / train_seconds)}
            epoch, batch_in_epoch = epoch + 1, 0
            progress = {"loss_sum": 0.0, "characters": 0, "seconds": 0.0}
            history.append(row)
            if row["validation_f1"] > best_f1:
                best_f1 = row["validation_f1"]
                save_checkpoint(best_path, snapshot(generator.get_state()))
            save_last(generator.get_state())  # the next epoch starts from this generator state
            write_metrics(history, metrics_path)
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss "
                       f"{row['validation_loss']:.4f}, entity F1 {row['validation_f1']:.4f} "
                       f"({row['train_seconds']:.0f} s, {row['chars_per_second']} chars/s)")
            plot_curves(history, out_dir / "curves.png")
            if stop.requested and epoch < args.epochs:
                return announce_stop(row)
            if epoch == args.stop_after and epoch < args.epochs:
                tqdm.write(f"stopped after epoch {epoch} as asked; continue with --resume")
                return row
    finally:
        stop.close()
    tqdm.write(f"best validation entity F1 {best_f1:.4f}; checkpoints in {out_dir}")
    tqdm.write(f"score it on the test set with: python gru/eval.py --checkpoint {best_path}")
    return row


def write_metrics(history: list[dict], path: Path) -> None:
    """metrics.jsonl, one row per finished epoch, replaced atomically."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(temporary, path)


def main(argv=None) -> int:
    """Run train() and turn user errors into one line on stderr."""
    args = parse_args(argv)
    if args.threads or "OMP_NUM_THREADS" not in os.environ:  # --threads, else OMP_NUM_THREADS, else 1
        torch.set_num_threads(args.threads or 1)
    try:
        train(args)
    except (UserError, DataError, ValueError, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
