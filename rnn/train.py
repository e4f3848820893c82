"""Train the character RNN to tell a surname's language: `python rnn/train.py` reproduces the README's table."""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataError  # noqa: E402
from rnn.metrics import classification_metrics, predict_probabilities  # noqa: E402
from rnn.model import ClassifierConfig, NameClassifier, clip_gradient_norm  # noqa: E402
from rnn.names import Alphabet, class_counts, encode_split, load_pairs, stratified_split  # noqa: E402
from rnn.runs import (  # noqa: E402
    EXIT_INTERRUPTED,
    CheckpointError,
    RunError,
    StopFlag,
    check_run_folder,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    refuse_changed_settings,
    remove_run_files,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    warn_if_threads_changed,
    write_text_atomically,
)

# The arguments that change the run. --resume takes them from the saved run; naming one with another value is
# refused. (--epochs, also taken from the saved run, may be raised to train longer: the cosine schedule then
# stretches over the new total; --device and --no-progress may change freely.)
FIXED_ON_RESUME = ("impl", "hidden_size", "embedding_size", "num_layers", "bidirectional", "seed", "split_seed",
                   "limit", "batch_size", "learning_rate", "weight_decay", "dropout", "label_smoothing", "clip")
# Every file rnn/train.py (and rnn/eval.py's confusion matrix) writes into a run folder; --overwrite removes these.
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp",
             "curves.png", "confusion.png")
# What every rnn checkpoint holds (best.pt and last.pt alike); --resume needs RESUME_KEYS as well.
CHECKPOINT_KEYS = ("chapter", "model", "model_config", "train_arguments", "alphabet", "languages", "epoch")
RESUME_KEYS = ("optimizer", "schedule", "rng_states", "history", "best_val_accuracy")
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


def write_metrics(path, history):
    """metrics.jsonl: one JSON line per finished epoch, rewritten whole (atomically) from the run's history."""
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in history))


@dataclass
class Run:
    """One training run: its data, model and optimizer, and where it stands (what a checkpoint saves)."""

    arguments: argparse.Namespace
    device: torch.device
    out_dir: Path
    splits: dict
    alphabet: Alphabet
    languages: list
    train_data: tuple  # (ids (N, T), lengths (N,), labels (N,))
    val_data: tuple
    config: ClassifierConfig = None
    model: NameClassifier = None
    optimizer: torch.optim.Optimizer = None
    schedule: torch.optim.lr_scheduler.LambdaLR = None
    batches_per_epoch: int = 0
    # where the run stands: finished epochs, and inside the next one its batch order, batches done, loss so far
    finished_epochs: int = 0
    batches_done: int = 0
    order: torch.Tensor | None = None
    loss_sum: float = 0.0
    names_seen: int = 0
    step: int = 0
    saved_step: int | None = None  # the step last.pt holds
    best_accuracy: float = -1.0
    history: list = field(default_factory=list)
    elapsed_before: float = 0.0  # seconds of training in the sessions this one resumed
    started: float = field(default_factory=time.time)

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started


# ---- checkpoints: saving and restoring, side by side ----

def checkpoint_state(run):
    """Everything --resume and eval.py need, as tensors, dicts, lists, numbers and strings."""
    return {"chapter": "rnn", "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "model_config": run.config.to_dict(),
            "train_arguments": vars(run.arguments), "alphabet": run.alphabet.characters, "languages": run.languages,
            "epoch": run.finished_epochs, "batches_done": run.batches_done, "epoch_order": run.order,
            "epoch_loss_sum": run.loss_sum, "epoch_names_seen": run.names_seen, "step": run.step,
            "best_val_accuracy": run.best_accuracy, "history": run.history, "elapsed_seconds": run.elapsed(),
            "rng_states": rng_states(), "threads": torch.get_num_threads()}


def restore(run, saved):
    """Put a run back where last.pt left it: weights, optimizer, schedule, random generators, position."""
    path = run.out_dir / "last.pt"
    if saved["alphabet"] != run.alphabet.characters or saved["languages"] != run.languages:
        raise CheckpointError(f"{path} was trained on other names (alphabet or languages differ)")
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["schedule"])
        restore_rng_states(saved["rng_states"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exception:
        first_line = (str(exception).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path} does not fit this model ({first_line})") from None
    run.finished_epochs, run.best_accuracy, run.history = saved["epoch"], saved["best_val_accuracy"], saved["history"]
    run.batches_done, run.order = saved.get("batches_done", 0), saved.get("epoch_order")
    if run.batches_done and (not isinstance(run.order, torch.Tensor) or len(run.order) != len(run.train_data[2])):
        raise CheckpointError(f"{path} is not a readable rnn checkpoint (damaged batch order)")
    run.loss_sum, run.names_seen = saved.get("epoch_loss_sum", 0.0), saved.get("epoch_names_seen", 0)
    run.step = run.saved_step = saved.get("step", run.finished_epochs * run.batches_per_epoch)
    run.elapsed_before = saved.get("elapsed_seconds", 0.0)
    warn_if_threads_changed(saved.get("threads"))
    print(f"resumed from {path} at step {run.step} (epoch {run.finished_epochs + 1}, "
          f"batch {run.batches_done} of {run.batches_per_epoch})")


def load_run_checkpoint(path, required=CHECKPOINT_KEYS):
    """A checkpoint written by rnn/train.py (loaded on the CPU), or one CheckpointError line saying why not."""
    state = load_checkpoint(path, "rnn", required)
    if state["chapter"] != "rnn":
        raise CheckpointError(f"{path} is not a readable rnn checkpoint (it was not written by rnn/train.py)")
    return state


def model_from_checkpoint(state, device, impl=None):
    """Rebuild the NameClassifier stored in a checkpoint (optionally with the other --impl) on `device`."""
    try:
        config = ClassifierConfig(**state["model_config"])
        if impl is not None:
            config.impl = impl
        model = NameClassifier(config)
        model.load_state_dict(state["model"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as exception:
        first_line = (str(exception).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"the checkpoint's weights do not fit its config ({first_line})") from None
    return model.to(device)


# ---- set-up, the loop, finish ----

def set_up(arguments, given=()):
    """Check the run folder, take a resumed run's settings, load the data, build the model (and restore it)."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir)
    check_run_folder(out_dir, arguments.resume, arguments.overwrite)
    if arguments.overwrite:
        remove_run_files(out_dir, RUN_FILES)
    saved = None
    if arguments.resume:
        saved = load_run_checkpoint(out_dir / "last.pt", CHECKPOINT_KEYS + RESUME_KEYS)
        for name in (*FIXED_ON_RESUME, "epochs"):
            if name not in given and name in saved["train_arguments"]:
                setattr(arguments, name, saved["train_arguments"][name])
        refuse_changed_settings(saved["train_arguments"], vars(arguments), FIXED_ON_RESUME)
    splits, alphabet, languages = prepare_data(arguments.split_seed, arguments.limit)
    print_class_counts(splits, languages)
    train_data = encode_split(splits["train"], alphabet, languages)  # (ids, lengths, labels)
    val_data = encode_split(splits["validation"], alphabet, languages)
    run = Run(arguments, device, out_dir, splits, alphabet, languages, train_data, val_data)

    torch.manual_seed(arguments.seed)
    run.config = ClassifierConfig(len(alphabet), len(languages), arguments.embedding_size, arguments.hidden_size,
                                  arguments.num_layers, arguments.bidirectional, arguments.dropout, arguments.impl)
    run.model = NameClassifier(run.config).to(device)
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=arguments.learning_rate,
                                      weight_decay=arguments.weight_decay)
    run.batches_per_epoch = math.ceil(len(run.train_data[2]) / arguments.batch_size)
    total_steps = arguments.epochs * run.batches_per_epoch
    # Cosine decay of the learning rate from its peak to 0 over the whole run.
    run.schedule = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    if saved is not None:
        restore(run, saved)
    print(f"{arguments.impl} RNN, {sum(p.numel() for p in run.model.parameters()):,} parameters, device {device}")
    run.started = time.time()
    return run


def stop_if_not_finite(run, loss, what, at_step):
    """A diverged run stops before writing anything: the weights in memory may already be ruined."""
    if not math.isfinite(loss):
        good = (f"last.pt (step {run.saved_step}) holds the last good state" if run.saved_step is not None
                else "no checkpoint was written yet")
        raise RunError(f"the {what} loss is not finite at step {at_step}; stopped without saving: {good}")


def train_epoch(run, epoch, stop):
    """The batches of one epoch not yet done; returns early, at a step boundary, when Ctrl-C asks to stop."""
    arguments, model, (train_ids, train_lengths, train_labels) = run.arguments, run.model, run.train_data
    model.train()
    if run.batches_done == 0:
        run.order = torch.randperm(len(train_labels))  # this epoch's batch order
        run.loss_sum, run.names_seen = 0.0, 0
    progress = tqdm(range(run.batches_done, run.batches_per_epoch), desc=f"epoch {epoch}", leave=False,
                    disable=arguments.no_progress)
    for batch in progress:
        indices = run.order[batch * arguments.batch_size:(batch + 1) * arguments.batch_size]
        lengths = train_lengths[indices]  # (B,)
        character_ids = train_ids[indices, : int(lengths.max())].to(run.device)  # (B, T)
        labels = train_labels[indices].to(run.device)  # (B,)
        logits = model(character_ids, lengths.to(run.device))  # (B, C)
        loss = F.cross_entropy(logits, labels, label_smoothing=arguments.label_smoothing)
        loss_value = loss.item()
        stop_if_not_finite(run, loss_value, "training", run.step + 1)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if arguments.clip > 0:
            clip_gradient_norm(model.parameters(), arguments.clip)
        run.optimizer.step()
        run.schedule.step()
        run.loss_sum += loss_value * len(indices)
        run.names_seen += len(indices)
        run.step, run.batches_done = run.step + 1, batch + 1
        progress.set_postfix(loss=f"{run.loss_sum / run.names_seen:.3f}")
        if stop.requested:  # a step boundary: the next batch's randomness is not drawn yet
            return


def validate_and_save(run, epoch):
    """Score the finished epoch on validation, log it, and write best.pt (if it improved), last.pt and metrics."""
    val_ids, val_lengths, val_labels = run.val_data
    probabilities = predict_probabilities(run.model, val_ids, val_lengths, run.device)
    scores = classification_metrics(val_labels, probabilities)
    val_loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), val_labels).item()
    stop_if_not_finite(run, val_loss, "validation", run.step)
    row = {"epoch": epoch, "train_loss": run.loss_sum / run.names_seen, "val_loss": val_loss,
           "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"], "seconds": round(run.elapsed(), 1)}
    run.history.append(row)
    run.finished_epochs, run.batches_done, run.order, run.loss_sum, run.names_seen = epoch, 0, None, 0.0, 0
    improved = scores["accuracy"] > run.best_accuracy
    if improved:
        run.best_accuracy = scores["accuracy"]
        save_checkpoint(run.out_dir / "best.pt", checkpoint_state(run))
    save_checkpoint(run.out_dir / "last.pt", checkpoint_state(run))
    run.saved_step = run.step
    write_metrics(run.out_dir / "metrics.jsonl", run.history)
    print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
          f"val acc {scores['accuracy']:.4f}  val macro-F1 {scores['macro_f1']:.4f}"
          f"{'  (best)' if improved else ''}  {row['seconds']:.0f}s", flush=True)


def train_epochs(run):
    """The loop: epochs of training, each followed by validation; False when Ctrl-C stopped it (last.pt saved)."""
    stop = StopFlag()
    try:
        for epoch in range(run.finished_epochs + 1, run.arguments.epochs + 1):
            train_epoch(run, epoch, stop)
            if not stop.requested:  # after a stop, this epoch's validation (if its batches are done) runs on resume
                validate_and_save(run, epoch)
            if stop.requested:  # a Ctrl-C during validation lets the epoch finish and save first
                if run.saved_step != run.step:
                    save_checkpoint(run.out_dir / "last.pt", checkpoint_state(run))
                print(f"stopped at step {run.step}; resume with: python rnn/train.py --out-dir {run.out_dir} --resume")
                return False
    finally:
        stop.close()
    return True


def finish(run):
    """The curves, and the test score of the best checkpoint (the test split is touched only here)."""
    if run.history:
        plot_curves(run.history, run.out_dir / "curves.png")
    best = load_run_checkpoint(run.out_dir / "best.pt")
    test_ids, test_lengths, test_labels = encode_split(run.splits["test"], run.alphabet, run.languages)
    best_model = model_from_checkpoint(best, run.device)
    scores = classification_metrics(test_labels, predict_probabilities(best_model, test_ids, test_lengths, run.device))
    print(f"best epoch {best['epoch']} (val acc {best['best_val_accuracy']:.4f}): test accuracy "
          f"{scores['accuracy']:.4f}, test macro-F1 {scores['macro_f1']:.4f}, {run.elapsed():.0f}s of training")


def train(arguments, given=()):
    """The whole run: set-up (and restore), the loop, then the test score; 0, or EXIT_INTERRUPTED after Ctrl-C.

    `given`: the arguments named on the command line; on --resume the others come from the saved run."""
    run = set_up(arguments, given)
    if not train_epochs(run):
        return EXIT_INTERRUPTED
    finish(run)
    return 0


def main(argv=None):
    """Entry point: user errors end as one `error:` line on stderr; a run stopped by Ctrl-C exits with 130."""
    arguments = parse_arguments(argv)
    try:
        status = train(arguments, flags_given(argv))
    except (DataError, RunError, ValueError, OSError) as exception:
        sys.exit(f"error: {exception}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted: stopped at once, nothing more saved (last.pt holds the last saved state)")
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
