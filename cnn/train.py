"""Train the CNN on MNIST: python cnn/train.py [--impl handwritten|torch] [--backprop autograd|manual]."""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn.mnist import MnistError, load_split, random_shift  # noqa: E402
from cnn.model import CNNConfig, build_model, manual_training_step  # noqa: E402
from cnn.runs import (  # noqa: E402
    EXIT_INTERRUPTED,
    RunError,
    StopFlag,
    check_run_folder,
    int_in_range,
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
    seed_int,
    warn_if_threads_changed,
    write_text_atomically,
)
from data import DataError  # noqa: E402

# The settings that define a run: a resume refuses a change of any of them (--epochs too: the cosine schedule ends
# at the last step of the last epoch). --device and --data-dir may change.
FIXED_ON_RESUME = ("impl", "backprop", "conv_backward", "epochs", "batch_size", "lr", "warmup_steps", "momentum",
                   "weight_decay", "dropout", "pooling", "augment_shift", "train_images", "validation_images",
                   "log_every", "seed")
# What --resume reads from last.pt besides the fields of every checkpoint ("model", "run_settings").
RESUME_KEYS = ("optimizer", "epoch", "batch_in_epoch", "arguments", "best_validation_accuracy", "torch_rng_state",
               "augment_rng_state")
# The files a training run (and eval.py's figures) write into a run folder; --overwrite removes exactly these.
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "curves.png",
             "confusion.png", "predictions.png", "misclassified.png", "filters.png", "feature_maps_block1.png",
             "feature_maps_block2.png")


def build_parser():
    """Every flag, with the range each one accepts; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", default="handwritten", choices=["handwritten", "torch"],
                        help="hand-written layers (layers.py) or the torch.nn reference")
    parser.add_argument("--backprop", default="autograd", choices=["autograd", "manual"],
                        help="autograd: loss.backward() through the hand-written Functions; manual: no autograd, "
                             "the hand-written backward chained by model.manual_forward_backward (handwritten only)")
    parser.add_argument("--conv-backward", default="col2im", choices=["col2im", "rot180"],
                        help="how the hand-written conv computes dJ/da: im2col order or the literal rot180 form")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the 55,000 training images")
    parser.add_argument("--batch-size", type=int_in_range(1, 55000), default=128, help="images per SGD step")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=100,
                        help="steps of linear learning-rate warm-up")
    parser.add_argument("--momentum", type=probability, default=0.9, help="SGD momentum mu, in [0, 1)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="L2 weight decay lambda")
    parser.add_argument("--dropout", type=probability, default=0.5,
                        help="dropout probability before the last layer, in [0, 1)")
    parser.add_argument("--pooling", default="max", choices=["max", "avg"], help="max or average pooling")
    parser.add_argument("--augment-shift", type=int_in_range(0, 14), default=2,
                        help="random shift of up to this many pixels (0: off)")
    parser.add_argument("--train-images", type=non_negative_int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--validation-images", type=non_negative_int, default=0,
                        help="use only N validation images (0: all 5,000)")
    parser.add_argument("--log-every", type=positive_int, default=50, help="steps between training-loss records")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four MNIST IDX files (default: fetched by the data helper)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisation, shuffling and dropout")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/cnn", help="folder for checkpoints, metrics.jsonl and plots")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    return parser


def parse_arguments(argv=None):
    """The command line, checked: each flag's own range, then the rules that tie two flags together."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.backprop == "manual" and arguments.impl != "handwritten":
        parser.error("--backprop manual needs --impl handwritten")
    return arguments


def learning_rate_at(step, total_steps, peak, warmup_steps):
    """Linear warm-up to `peak`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    """Mean cross-entropy and accuracy of `model` on (images, labels), in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])  # (B, 10)
        batch_labels = labels[start : start + batch_size]
        total_loss += model.loss(logits, batch_labels).item() * batch_labels.shape[0]
        correct += (logits.argmax(dim=1) == batch_labels).sum().item()
    model.train(was_training)
    return total_loss / images.shape[0], correct / images.shape[0]


def load_run_checkpoint(path, required=()) -> dict:
    """A checkpoint written by this script (on the CPU), or one line saying why the file is not one."""
    return load_checkpoint(path, "cnn", ("model", "run_settings", *required))


def momentum_buffers(optimizer):
    """The velocity v of every parameter, kept in torch.optim.SGD's own state so checkpoints hold one format."""
    velocities = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(parameter)
            velocities[parameter] = state["momentum_buffer"]
    return velocities


def plot_curves(records, path):
    """Loss and accuracy curves of a run, from its metrics records."""
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], label="train (running mean)")
    loss_axis.plot([r["step"] for r in epochs], [r["validation_loss"] for r in epochs], "o-", label="validation")
    loss_axis.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    loss_axis.legend()
    accuracy_axis.plot([r["epoch"] for r in epochs], [100 * r["train_accuracy"] for r in epochs], "o-", label="train")
    accuracy_axis.plot([r["epoch"] for r in epochs], [100 * r["validation_accuracy"] for r in epochs], "o-",
                       label="validation")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_records(records, path):
    """Rewrite metrics.jsonl from the records a checkpoint holds (a resumed run continues exactly this log)."""
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


@dataclass
class Run:
    """One training run: data, model, optimizer, and where it stands (what a checkpoint saves)."""

    arguments: object
    device: torch.device
    out_dir: Path
    train_images: torch.Tensor  # (N, 1, 28, 28)
    train_labels: torch.Tensor  # (N,)
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    model: torch.nn.Module
    optimizer: torch.optim.SGD
    run_settings: dict
    steps_per_epoch: int
    augment_generator: torch.Generator = None
    velocities: dict | None = None  # --backprop manual: SGD's momentum buffers by parameter name
    epoch: int = 0
    batch_in_epoch: int = 0
    best_accuracy: float = -1.0
    records: list = field(default_factory=list)
    saved_step: int | None = None  # the step last.pt holds
    # what the records sum up: the running training loss (logged every --log-every steps) and the epoch's accuracy
    # and seconds (logged every epoch); saved with the weights, so that a resumed run logs the same numbers
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "loss_images": 0, "correct": 0, "seen": 0,
                                                "epoch_seconds": 0.0})
    session_start: float = field(default_factory=time.time)

    @property
    def step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch_in_epoch

    def epoch_seconds(self) -> float:
        """Seconds spent on the current epoch, in this session and the ones it resumed."""
        return self.sums["epoch_seconds"] + time.time() - self.session_start

    def last_good(self) -> str:
        """Which checkpoint a run that diverged leaves as its last good state."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"{self.out_dir / 'last.pt'} (step {self.saved_step}) holds the last good state"

    def log(self, record: dict) -> None:
        """Keep a record and append it to metrics.jsonl."""
        self.records.append(record)
        with (self.out_dir / "metrics.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")


# ---- checkpoints: saving and restoring, side by side ----

def checkpoint_state(run: Run) -> dict:
    """Everything a checkpoint holds (tensors, dicts, lists, numbers, strings only), all of one finished step."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "run_settings": run.run_settings, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
            "best_validation_accuracy": run.best_accuracy, "records": list(run.records),
            "sums": dict(run.sums, epoch_seconds=run.epoch_seconds()), "torch_rng_state": rng_states(),
            "augment_rng_state": run.augment_generator.get_state(), "arguments": vars(run.arguments),
            "threads": torch.get_num_threads()}


def restore(run: Run, checkpoint: dict) -> None:
    """Put a run back where last.pt left it; metrics.jsonl is cut back to the records of that step."""
    last_path, metrics_path = run.out_dir / "last.pt", run.out_dir / "metrics.jsonl"
    if checkpoint["run_settings"] != run.run_settings:
        raise RunError(f"--resume: {last_path} was trained with {checkpoint['run_settings']}, not {run.run_settings}")
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.epoch, run.batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
    run.best_accuracy = checkpoint["best_validation_accuracy"]
    run.saved_step = run.step
    if "records" in checkpoint:
        run.records = checkpoint["records"]
    elif metrics_path.exists():  # a checkpoint from before records were kept in it: the log up to its step
        lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        run.records = [record for record in lines if record["step"] <= run.saved_step]
    run.sums.update(checkpoint.get("sums", {}))
    saved_rng = checkpoint["torch_rng_state"]
    restore_rng_states(saved_rng if isinstance(saved_rng, dict) else {"cpu": saved_rng})
    run.augment_generator.set_state(checkpoint["augment_rng_state"])
    write_records(run.records, metrics_path)  # drops any line logged after this checkpoint was saved
    warn_if_threads_changed(checkpoint.get("threads"))
    print(f"resumed from {last_path} at epoch {run.epoch + 1}, batch {run.batch_in_epoch}")


# ---- set-up, the loop, finish ----

def set_up(arguments) -> Run:
    """Check the run folder, load the data, build the model and optimizer; on --resume, restore last.pt."""
    out_dir = Path(arguments.out_dir)
    check_run_folder(out_dir, arguments.resume, arguments.overwrite)
    checkpoint = load_run_checkpoint(out_dir / "last.pt", RESUME_KEYS) if arguments.resume else None
    if checkpoint is not None:
        refuse_changed_settings(checkpoint["arguments"], vars(arguments), FIXED_ON_RESUME)
    device = pick_device(arguments.device)
    if arguments.overwrite:  # the old run's files go once nothing refused the new one
        remove_run_files(out_dir, RUN_FILES)
    config = CNNConfig(dropout=arguments.dropout, pooling=arguments.pooling)
    train_images, train_labels = load_split("train", arguments.data_dir, arguments.train_images)
    validation_images, validation_labels = load_split("validation", arguments.data_dir, arguments.validation_images)
    model = build_model(config, arguments.impl, arguments.seed, arguments.conv_backward).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=arguments.lr, momentum=arguments.momentum,
                                weight_decay=arguments.weight_decay)
    run = Run(arguments, device, out_dir, train_images.to(device), train_labels.to(device),
              validation_images.to(device), validation_labels.to(device), model, optimizer,
              run_settings={"impl": arguments.impl, "config": config.to_dict()},
              steps_per_epoch=math.ceil(train_images.shape[0] / arguments.batch_size))
    torch.manual_seed(arguments.seed)
    run.augment_generator = torch.Generator().manual_seed(arguments.seed + 1)
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")  # a fresh run starts a fresh log
    if run.epoch >= arguments.epochs:
        print(f"{out_dir / 'last.pt'} has already trained {run.epoch} of {arguments.epochs} epochs; nothing to do")
    if arguments.backprop == "manual":  # the no-autograd step updates torch.optim.SGD's own buffers, by name
        buffers = momentum_buffers(optimizer)
        run.velocities = {name: buffers[parameter] for name, parameter in model.named_parameters()}
    return run


def check_finite(loss, which, step, last_good):
    """A diverged run stops here, before anything is written: one line naming the step and the good checkpoint."""
    if not math.isfinite(loss):
        raise RunError(f"the {which} loss is not finite at step {step}; stopped without saving: {last_good()}")


def training_step(run: Run, order: torch.Tensor) -> None:
    """One SGD step on the next batch of `order`: augment, forward, backward, update, and the running sums."""
    arguments, step = run.arguments, run.step
    indices = order[run.batch_in_epoch * arguments.batch_size : (run.batch_in_epoch + 1) * arguments.batch_size]
    images = random_shift(run.train_images[indices], arguments.augment_shift, run.augment_generator)
    labels = run.train_labels[indices]
    total_steps = run.steps_per_epoch * arguments.epochs
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(step, total_steps, arguments.lr, arguments.warmup_steps)
    if arguments.backprop == "manual":
        # no autograd: hand-written backward, hand-written SGD update on torch.optim.SGD's buffers
        loss, logits = manual_training_step(run.model, images, labels, run.velocities,
                                            run.optimizer.param_groups[0]["lr"], arguments.momentum,
                                            arguments.weight_decay, return_logits=True)
        check_finite(loss.item(), "training", step + 1, run.last_good)  # a non-finite loss updated nothing
    else:
        logits = run.model(images)  # (B, 10)
        loss = run.model.loss(logits, labels)
        check_finite(loss.item(), "training", step + 1, run.last_good)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
    run.sums["loss"] += loss.item() * labels.shape[0]
    run.sums["loss_images"] += labels.shape[0]
    run.sums["correct"] += (logits.argmax(dim=1) == labels).sum().item()
    run.sums["seen"] += labels.shape[0]
    run.batch_in_epoch += 1


def train_epoch(run: Run, stop: StopFlag) -> bool:
    """The steps of the epoch in progress not yet done; True when Ctrl-C stopped it mid-epoch."""
    arguments = run.arguments
    run.session_start = time.time()
    # the order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches
    order = torch.randperm(run.train_images.shape[0], generator=torch.Generator().manual_seed(
        arguments.seed * 1000 + run.epoch)).to(run.device)
    progress = tqdm(total=run.steps_per_epoch, initial=run.batch_in_epoch,
                    desc=f"epoch {run.epoch + 1}/{arguments.epochs}", leave=False)
    while run.batch_in_epoch < run.steps_per_epoch:
        training_step(run, order)
        progress.update(1)
        if run.step % arguments.log_every == 0:
            run.log({"kind": "step", "step": run.step, "train_loss": run.sums["loss"] / run.sums["loss_images"]})
            progress.set_postfix(loss=f"{run.records[-1]['train_loss']:.4f}")
            run.sums.update(loss=0.0, loss_images=0)
        # a step boundary: this step is complete and nothing random of the next one is drawn yet (the epoch's
        # last step goes on to its validation, which draws nothing, and stops after it)
        if stop.requested and run.batch_in_epoch < run.steps_per_epoch:
            progress.close()
            return True
    progress.close()
    return False


def validate_and_save(run: Run) -> dict:
    """Validate the finished epoch, log its record, write best.pt (if it improved), last.pt and the curves."""
    validation_loss, validation_accuracy = evaluate(run.model, run.validation_images, run.validation_labels)
    check_finite(validation_loss, "validation", (run.epoch + 1) * run.steps_per_epoch, run.last_good)
    record = {"kind": "epoch", "epoch": run.epoch + 1, "step": (run.epoch + 1) * run.steps_per_epoch,
              "train_accuracy": run.sums["correct"] / max(1, run.sums["seen"]), "validation_loss": validation_loss,
              "validation_accuracy": validation_accuracy, "seconds": run.epoch_seconds()}
    run.log(record)
    print(f"epoch {run.epoch + 1}: train acc {100 * record['train_accuracy']:.2f}%  validation loss "
          f"{validation_loss:.4f} acc {100 * validation_accuracy:.2f}%  ({record['seconds']:.0f} s)")
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    run.sums.update(loss=0.0, loss_images=0, correct=0, seen=0, epoch_seconds=0.0)  # each epoch starts afresh
    run.session_start = time.time()
    if validation_accuracy > run.best_accuracy:
        run.best_accuracy = validation_accuracy
        save_checkpoint(run.out_dir / "best.pt", checkpoint_state(run))
    save_checkpoint(run.out_dir / "last.pt", checkpoint_state(run))
    run.saved_step = run.step
    plot_curves(run.records, run.out_dir / "curves.png")
    return record


def train_epochs(run: Run) -> bool:
    """The loop: epochs of training, each followed by validation; False when Ctrl-C stopped it (last.pt saved)."""
    run.model.train()
    stop = StopFlag()
    try:
        while run.epoch < run.arguments.epochs:
            stopped_mid_epoch = train_epoch(run, stop)
            if not stopped_mid_epoch:
                validate_and_save(run)
            if stopped_mid_epoch or (stop.requested and run.epoch < run.arguments.epochs):
                if run.saved_step != run.step:  # unless the epoch's end just saved this very step
                    save_checkpoint(run.out_dir / "last.pt", checkpoint_state(run))
                print(f"stopped at step {run.step}; resume with: python cnn/train.py --out-dir {run.out_dir} --resume")
                return False
    finally:
        stop.close()
    return True


def train(arguments):
    """Set-up (and restore), the loop; returns the last epoch's metrics record and whether the run finished."""
    run = set_up(arguments)
    finished = train_epochs(run)
    return next((r for r in reversed(run.records) if r["kind"] == "epoch"), {}), finished


def main(argv=None):
    """Entry point: user errors end with one line on stderr and exit status 1; a Ctrl-C stop exits with 130."""
    arguments = parse_arguments(argv)
    try:
        record, finished = train(arguments)
    except (RunError, DataError, MnistError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"error: {message}")
    except KeyboardInterrupt:
        sys.exit("interrupted before the end of a step: nothing was saved since the last checkpoint")
    print(json.dumps(record))
    if not finished:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
