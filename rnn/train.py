"""Train the character RNN to tell a surname's language: `python rnn/train.py` reproduces the README's table."""

import argparse
import json
import math
import os
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
from rnn.checkpoint import (  # noqa: E402
    CHECKPOINT_KEYS,
    RESUME_KEYS,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    sync_folder,
)
from rnn.metrics import classification_metrics, predict_probabilities  # noqa: E402
from rnn.model import ClassifierConfig, NameClassifier, clip_gradient_norm  # noqa: E402
from rnn.names import Alphabet, class_counts, encode_split, load_pairs, stratified_split  # noqa: E402
from rnn.runs import (  # noqa: E402
    RunError,
    StopFlag,
    int_in_range,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    prepare_run_folder,
    probability,
)

# The arguments that change the run. --resume takes them from the saved run; naming one with another value is
# refused. (--epochs, also taken from the saved run, may be raised to train longer: the cosine schedule then
# stretches over the new total; --device and --no-progress may change freely.)
FIXED_ON_RESUME = ("impl", "hidden_size", "embedding_size", "num_layers", "bidirectional", "seed", "split_seed",
                   "limit", "batch_size", "learning_rate", "weight_decay", "dropout", "label_smoothing", "clip")
MAX_PARAMETERS = 50_000_000  # a CPU-sized model; far above the README's 180 thousand


def build_parser():
    """The command line; every default is the configuration of the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten",
                        help="the hand-written RNN with its own BPTT, or torch.nn.RNN")
    parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training names")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="names per mini-batch")
    parser.add_argument("--hidden-size", type=positive_int, default=256, help="size of the hidden state h_t")
    parser.add_argument("--embedding-size", type=positive_int, default=64,
                        help="size of each character's embedding x_t")
    parser.add_argument("--num-layers", type=positive_int, default=1, help="stacked RNN layers")
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                        help="also read each name right to left")
    parser.add_argument("--dropout", type=probability, default=0.3,
                        help="dropout on embeddings, between layers and before the head, in [0, 1)")
    parser.add_argument("--learning-rate", type=positive_float, default=2e-3,
                        help="peak AdamW learning rate (cosine decay to 0)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--label-smoothing", type=probability, default=0.0,
                        help="label smoothing of the cross-entropy, in [0, 1)")
    parser.add_argument("--clip", type=non_negative_float, default=1.0,
                        help="clip the gradient's global L2 norm to this (0: off)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of initialisation, dropout and batch order")
    parser.add_argument("--split-seed", type=non_negative_int, default=0,
                        help="seed of the train/validation/test split")
    parser.add_argument("--limit", type=non_negative_int, default=0,
                        help="use only this many training names (0: all; for tests)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--threads", type=int_in_range(1, 1024), default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1; the README measures 1 "
                             "against 2)")
    parser.add_argument("--out-dir", default="runs/rnn", help="folder for checkpoints, metrics.jsonl and plots")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def parse_arguments(argv=None):
    """Parse and check the command line; a model too large for this chapter is refused before any work."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    directions = 2 if arguments.bidirectional else 1
    hidden, embedding = arguments.hidden_size, arguments.embedding_size
    # Rough count (about 100 characters, 18 languages): embedding, first layer, the layers above it, head.
    parameters = (100 * embedding + directions * hidden * (embedding + hidden + 2)
                  + (arguments.num_layers - 1) * directions * hidden * (directions * hidden + hidden + 2)
                  + 18 * (directions * hidden + 1))
    if parameters > MAX_PARAMETERS:
        parser.error(f"--hidden-size {hidden}, --embedding-size {embedding} and --num-layers {arguments.num_layers} "
                     f"make about {parameters:,} parameters; this chapter trains up to {MAX_PARAMETERS:,}")
    return arguments


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


def flags_given(argv=None):
    """The names of the arguments that the command line sets (the others hold their defaults)."""
    parser, unset = build_parser(), object()
    names = vars(parser.parse_args([]))
    given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(given).items() if value is not unset}


def refuse_changed_settings(saved_arguments, arguments):
    """A resumed run keeps the settings that shape it: one line naming the first flag that changed."""
    for name in FIXED_ON_RESUME:
        before, now = saved_arguments.get(name), getattr(arguments, name)
        if before != now:
            raise RunError(f"--{name.replace('_', '-')} was {before} in the saved run and is {now} now; "
                           "a resumed run keeps its settings (start a new run with --out-dir)")


def write_metrics(path, history):
    """metrics.jsonl: one JSON line per finished epoch, rewritten whole (atomically) from the run's history."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in history)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def random_states(device):
    """The random generators' states, as CPU tensors: batch order, dropout (on the CPU or the device)."""
    states = {"rng_state": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng_state"] = torch.cuda.get_rng_state(device).cpu()
    if device.type == "mps":
        states["mps_rng_state"] = torch.mps.get_rng_state().cpu()
    return states


def restore_random_states(state, device):
    """Put back the generators saved by random_states (kept on the CPU, as torch.set_rng_state wants them)."""
    torch.set_rng_state(state["rng_state"].cpu())
    if device.type == "cuda" and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"].cpu(), device)
    if device.type == "mps" and "mps_rng_state" in state:
        torch.mps.set_rng_state(state["mps_rng_state"].cpu())


def train(arguments, given=()):
    """The whole run: data, model, epochs with validation-based model selection, final test score.

    `given`: the arguments named on the command line; on --resume the others come from the saved run."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir)
    prepare_run_folder(out_dir, arguments.resume, arguments.overwrite)
    saved = None
    if arguments.resume:
        saved = load_checkpoint(out_dir / "last.pt", required=CHECKPOINT_KEYS + RESUME_KEYS)
        for name in (*FIXED_ON_RESUME, "epochs"):
            if name not in given and name in saved["train_arguments"]:
                setattr(arguments, name, saved["train_arguments"][name])
        refuse_changed_settings(saved["train_arguments"], arguments)
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
    # Where the run stands: finished epochs, and inside the next one its batch order, batches done, loss so far.
    finished_epochs, batches_done, order, loss_sum, names_seen = 0, 0, None, 0.0, 0
    step, saved_step, best_accuracy, history, elapsed_before = 0, None, -1.0, [], 0.0
    if saved is not None:
        if saved["alphabet"] != alphabet.characters or saved["languages"] != languages:
            raise CheckpointError(f"{out_dir / 'last.pt'} was trained on other names (alphabet or languages differ)")
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            restore_random_states(saved, device)
        except (RuntimeError, ValueError, KeyError, TypeError) as exception:
            first_line = (str(exception).strip().splitlines() or [""])[0][:120]
            raise CheckpointError(f"{out_dir / 'last.pt'} does not fit this model ({first_line})") from None
        finished_epochs, best_accuracy, history = saved["epoch"], saved["best_val_accuracy"], saved["history"]
        batches_done, order = saved.get("batches_done", 0), saved.get("epoch_order")
        if batches_done and (not isinstance(order, torch.Tensor) or len(order) != len(train_labels)):
            raise CheckpointError(f"{out_dir / 'last.pt'} is not a readable rnn checkpoint (damaged batch order)")
        loss_sum, names_seen = saved.get("epoch_loss_sum", 0.0), saved.get("epoch_names_seen", 0)
        step = saved_step = saved.get("step", finished_epochs * batches_per_epoch)
        elapsed_before = saved.get("elapsed_seconds", 0.0)
        print(f"resumed from {out_dir / 'last.pt'} at step {step} (epoch {finished_epochs + 1}, "
              f"batch {batches_done} of {batches_per_epoch})")
    print(f"{arguments.impl} RNN, {sum(p.numel() for p in model.parameters()):,} parameters, device {device}")
    started = time.time()

    def checkpoint_state():
        """Everything --resume and eval.py need, as tensors, dicts, lists, numbers and strings."""
        return {"chapter": "rnn", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "model_config": config.to_dict(),
                "train_arguments": vars(arguments), "alphabet": alphabet.characters, "languages": languages,
                "epoch": finished_epochs, "batches_done": batches_done, "epoch_order": order,
                "epoch_loss_sum": loss_sum, "epoch_names_seen": names_seen, "step": step,
                "best_val_accuracy": best_accuracy, "history": history,
                "elapsed_seconds": elapsed_before + time.time() - started, **random_states(device)}

    def not_finite(what, at_step):
        """Stop before writing anything: the weights in memory may already be ruined."""
        good = f"last.pt (step {saved_step}) holds the last good state" if saved_step is not None else \
            "no checkpoint was written yet"
        sys.exit(f"error: the {what} loss is not finite at step {at_step}; stopped without saving: {good}")

    def stop_here():
        """Ctrl-C was pressed: save the finished state (if not saved at this very step) and say how to go on."""
        if saved_step != step:
            save_checkpoint(out_dir / "last.pt", checkpoint_state())
        print(f"stopped at step {step}; resume with: python rnn/train.py --out-dir {out_dir} --resume")

    stop = StopFlag()
    try:
        for epoch in range(finished_epochs + 1, arguments.epochs + 1):
            model.train()
            if batches_done == 0:
                order = torch.randperm(len(train_labels))  # this epoch's batch order
                loss_sum, names_seen = 0.0, 0
            progress = tqdm(range(batches_done, batches_per_epoch), desc=f"epoch {epoch}", leave=False,
                            disable=arguments.no_progress)
            for batch in progress:
                indices = order[batch * arguments.batch_size:(batch + 1) * arguments.batch_size]
                lengths = train_lengths[indices]  # (B,)
                character_ids = train_ids[indices, : int(lengths.max())].to(device)  # (B, T)
                labels = train_labels[indices].to(device)  # (B,)
                logits = model(character_ids, lengths.to(device))  # (B, C)
                loss = F.cross_entropy(logits, labels, label_smoothing=arguments.label_smoothing)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    not_finite("training", step + 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if arguments.clip > 0:
                    clip_gradient_norm(model.parameters(), arguments.clip)
                optimizer.step()
                schedule.step()
                loss_sum += loss_value * len(indices)
                names_seen += len(indices)
                step, batches_done = step + 1, batch + 1
                progress.set_postfix(loss=f"{loss_sum / names_seen:.3f}")
                if stop.requested:  # a step boundary: the next batch's randomness is not drawn yet
                    break
            if stop.requested:  # this epoch's validation (if all its batches are done) runs after --resume
                stop_here()
                return
            probabilities = predict_probabilities(model, val_ids, val_lengths, device)
            scores = classification_metrics(val_labels, probabilities)
            val_loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), val_labels).item()
            if not math.isfinite(val_loss):
                not_finite("validation", step)
            row = {"epoch": epoch, "train_loss": loss_sum / names_seen, "val_loss": val_loss,
                   "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                   "seconds": round(elapsed_before + time.time() - started, 1)}
            history.append(row)
            finished_epochs, batches_done, order, loss_sum, names_seen = epoch, 0, None, 0.0, 0
            improved = scores["accuracy"] > best_accuracy
            if improved:
                best_accuracy = scores["accuracy"]
                save_checkpoint(out_dir / "best.pt", checkpoint_state())
            save_checkpoint(out_dir / "last.pt", checkpoint_state())
            saved_step = step
            write_metrics(out_dir / "metrics.jsonl", history)
            print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val acc {scores['accuracy']:.4f}  val macro-F1 {scores['macro_f1']:.4f}"
                  f"{'  (best)' if improved else ''}  {row['seconds']:.0f}s", flush=True)
            if stop.requested:  # Ctrl-C during validation: the epoch is finished and saved
                stop_here()
                return
    finally:
        stop.close()
    if history:
        plot_curves(history, out_dir / "curves.png")
    best = load_checkpoint(out_dir / "best.pt")
    test_ids, test_lengths, test_labels = encode_split(splits["test"], alphabet, languages)
    best_model = model_from_checkpoint(best, device)
    scores = classification_metrics(test_labels, predict_probabilities(best_model, test_ids, test_lengths, device))
    print(f"best epoch {best['epoch']} (val acc {best['best_val_accuracy']:.4f}): test accuracy "
          f"{scores['accuracy']:.4f}, test macro-F1 {scores['macro_f1']:.4f}, "
          f"{elapsed_before + time.time() - started:.0f}s of training")


def main(argv=None):
    """Entry point: user errors end as one `error:` line on stderr."""
    arguments = parse_arguments(argv)
    if arguments.threads or "OMP_NUM_THREADS" not in os.environ:  # --threads, else OMP_NUM_THREADS, else 1
        torch.set_num_threads(arguments.threads or 1)
    try:
        train(arguments, flags_given(argv))
    except (DataError, CheckpointError, RunError, ValueError, OSError) as exception:
        sys.exit(f"error: {exception}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted: stopped at once, nothing more saved (last.pt holds the last saved state)")


if __name__ == "__main__":
    main()
