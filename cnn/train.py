"""Train the CNN on MNIST: python cnn/train.py [--impl handwritten|torch] [--backprop autograd|manual]."""

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

from cnn.mnist import MnistError, load_split, random_shift  # noqa: E402
from cnn.model import CNNConfig, build_model, manual_training_step  # noqa: E402
from cnn.runs import (  # noqa: E402
    StopFlag,
    UserError,
    changed_setting,
    int_in_range,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    prepare_run_folder,
    probability,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    seed_int,
)
from data import DataError  # noqa: E402

# The settings that define a run: a resume refuses a change of any of them (--epochs too: the cosine schedule ends
# at the last step of the last epoch). --device and --data-dir may change.
FIXED_ON_RESUME = ("impl", "backprop", "conv_backward", "epochs", "batch_size", "lr", "warmup_steps", "momentum",
                   "weight_decay", "dropout", "pooling", "augment_shift", "train_images", "validation_images",
                   "log_every", "seed")


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
    parser.add_argument("--threads", type=int_in_range(1, 1024), default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1; the README measures 1 "
                             "against 2)")
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
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, path)


def train(arguments):
    """The training loop; returns the last epoch's metrics record."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir)
    prepare_run_folder(out_dir, arguments.resume, arguments.overwrite)
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    checkpoint = None
    if arguments.resume:
        checkpoint = load_run_checkpoint(last_path, ("optimizer", "epoch", "batch_in_epoch", "arguments",
                                                     "best_validation_accuracy", "torch_rng_state",
                                                     "augment_rng_state"))
        changed = changed_setting(checkpoint["arguments"], vars(arguments), FIXED_ON_RESUME)
        if changed:
            raise UserError(changed)
    config = CNNConfig(dropout=arguments.dropout, pooling=arguments.pooling)
    train_images, train_labels = load_split("train", arguments.data_dir, arguments.train_images)
    validation_images, validation_labels = load_split("validation", arguments.data_dir, arguments.validation_images)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    validation_images, validation_labels = validation_images.to(device), validation_labels.to(device)

    model = build_model(config, arguments.impl, arguments.seed, arguments.conv_backward).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=arguments.lr, momentum=arguments.momentum,
                                weight_decay=arguments.weight_decay)
    steps_per_epoch = math.ceil(train_images.shape[0] / arguments.batch_size)
    total_steps = steps_per_epoch * arguments.epochs
    run_settings = {"impl": arguments.impl, "config": config.to_dict()}
    epoch, batch_in_epoch, best_accuracy, records, saved_step = 0, 0, -1.0, [], None
    # what the records sum up: the running training loss (logged every --log-every steps) and the epoch's accuracy
    # and seconds (logged every epoch); saved with the weights, so that a resumed run logs the same numbers
    sums = {"loss": 0.0, "loss_images": 0, "correct": 0, "seen": 0, "epoch_seconds": 0.0}
    torch.manual_seed(arguments.seed)
    augment_generator = torch.Generator().manual_seed(arguments.seed + 1)
    if checkpoint is not None:
        if checkpoint["run_settings"] != run_settings:
            raise UserError(f"--resume: {last_path} was trained with {checkpoint['run_settings']}, not {run_settings}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        epoch, batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
        best_accuracy = checkpoint["best_validation_accuracy"]
        saved_step = epoch * steps_per_epoch + batch_in_epoch
        if "records" in checkpoint:
            records = checkpoint["records"]
        elif metrics_path.exists():  # a checkpoint from before records were kept in it: the log up to its step
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            records = [record for record in lines if record["step"] <= saved_step]
        sums.update(checkpoint.get("sums", {}))
        saved_rng = checkpoint["torch_rng_state"]
        restore_rng_states(saved_rng if isinstance(saved_rng, dict) else {"cpu": saved_rng})
        augment_generator.set_state(checkpoint["augment_rng_state"])
        write_records(records, metrics_path)  # drops any line logged after this checkpoint was saved
        print(f"resumed from {last_path} at epoch {epoch + 1}, batch {batch_in_epoch}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")  # a fresh run starts a fresh log

    def state():
        """Everything a checkpoint holds (tensors, dicts, lists, numbers, strings only), all of one finished step."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "run_settings": run_settings,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_validation_accuracy": best_accuracy,
                "records": list(records), "sums": dict(sums, epoch_seconds=epoch_seconds()),
                "torch_rng_state": rng_states(), "augment_rng_state": augment_generator.get_state(),
                "arguments": vars(arguments)}

    def epoch_seconds():
        """Seconds spent on the current epoch, in this session and the ones it resumed."""
        return sums["epoch_seconds"] + time.time() - session_start

    def last_good():
        """Which checkpoint a run that diverged leaves as its last good state."""
        if saved_step is None:
            return "no checkpoint was written yet"
        return f"{last_path} (step {saved_step}) holds the last good state"

    def log(record):
        """Keep a record and append it to metrics.jsonl."""
        records.append(record)
        with metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def stop_here():
        """Ctrl-C was pressed: save the finished step (unless the epoch's end just did) and say how to go on."""
        step = epoch * steps_per_epoch + batch_in_epoch
        if saved_step != step:
            save_checkpoint(last_path, state())
        print(f"stopped at step {step}; resume with: python cnn/train.py --out-dir {out_dir} --resume")

    record = next((r for r in reversed(records) if r["kind"] == "epoch"), {})
    if epoch >= arguments.epochs:
        print(f"{last_path} has already trained {epoch} of {arguments.epochs} epochs; nothing to do")
    velocities = None
    if arguments.backprop == "manual":  # the no-autograd step updates torch.optim.SGD's own buffers, by name
        buffers = momentum_buffers(optimizer)
        velocities = {name: buffers[parameter] for name, parameter in model.named_parameters()}
    model.train()
    stop = StopFlag()
    try:
        while epoch < arguments.epochs:
            session_start = time.time()
            # the order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches
            order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(
                arguments.seed * 1000 + epoch)).to(device)
            progress = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{arguments.epochs}",
                            leave=False)
            while batch_in_epoch < steps_per_epoch:
                step = epoch * steps_per_epoch + batch_in_epoch
                indices = order[batch_in_epoch * arguments.batch_size : (batch_in_epoch + 1) * arguments.batch_size]
                images = random_shift(train_images[indices], arguments.augment_shift, augment_generator)
                labels = train_labels[indices]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total_steps, arguments.lr, arguments.warmup_steps)
                if arguments.backprop == "manual":
                    # no autograd: hand-written backward, hand-written SGD update on torch.optim.SGD's buffers
                    loss, logits = manual_training_step(model, images, labels, velocities,
                                                        optimizer.param_groups[0]["lr"], arguments.momentum,
                                                        arguments.weight_decay, return_logits=True)
                    check_finite(loss.item(), "training", step + 1, last_good)  # a non-finite loss updated nothing
                else:
                    logits = model(images)  # (B, 10)
                    loss = model.loss(logits, labels)
                    check_finite(loss.item(), "training", step + 1, last_good)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                sums["loss"] += loss.item() * labels.shape[0]
                sums["loss_images"] += labels.shape[0]
                sums["correct"] += (logits.argmax(dim=1) == labels).sum().item()
                sums["seen"] += labels.shape[0]
                batch_in_epoch += 1
                progress.update(1)
                if (step + 1) % arguments.log_every == 0:
                    log({"kind": "step", "step": step + 1, "train_loss": sums["loss"] / sums["loss_images"]})
                    progress.set_postfix(loss=f"{records[-1]['train_loss']:.4f}")
                    sums.update(loss=0.0, loss_images=0)
                # a step boundary: this step is complete and nothing random of the next one is drawn yet (the
                # epoch's last step goes on to its validation, which draws nothing, and stops after it)
                if stop.requested and batch_in_epoch < steps_per_epoch:
                    progress.close()
                    stop_here()
                    return record
            progress.close()
            validation_loss, validation_accuracy = evaluate(model, validation_images, validation_labels)
            check_finite(validation_loss, "validation", (epoch + 1) * steps_per_epoch, last_good)
            record = {"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                      "train_accuracy": sums["correct"] / max(1, sums["seen"]), "validation_loss": validation_loss,
                      "validation_accuracy": validation_accuracy, "seconds": epoch_seconds()}
            log(record)
            print(f"epoch {epoch + 1}: train acc {100 * record['train_accuracy']:.2f}%  validation loss "
                  f"{validation_loss:.4f} acc {100 * validation_accuracy:.2f}%  ({record['seconds']:.0f} s)")
            epoch, batch_in_epoch = epoch + 1, 0
            sums.update(loss=0.0, loss_images=0, correct=0, seen=0, epoch_seconds=0.0)  # each epoch starts afresh
            session_start = time.time()
            if validation_accuracy > best_accuracy:
                best_accuracy = validation_accuracy
                save_checkpoint(best_path, state())
            save_checkpoint(last_path, state())
            saved_step = epoch * steps_per_epoch
            plot_curves(records, out_dir / "curves.png")
            if stop.requested and epoch < arguments.epochs:
                stop_here()
                return record
    finally:
        stop.close()
    return record


def check_finite(loss, which, step, last_good):
    """A diverged run stops here, before anything is written: one line naming the step and the good checkpoint."""
    if not math.isfinite(loss):
        raise UserError(f"the {which} loss is not finite at step {step}; stopped without saving: {last_good()}")


def main(argv=None):
    """Entry point: user errors end with one line on stderr and exit status 1."""
    arguments = parse_arguments(argv)
    if arguments.threads or "OMP_NUM_THREADS" not in os.environ:  # --threads, else OMP_NUM_THREADS, else 1
        torch.set_num_threads(arguments.threads or 1)
    try:
        record = train(arguments)
    except (UserError, DataError, MnistError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"error: {message}")
    except KeyboardInterrupt:
        sys.exit("interrupted before the end of a step: nothing was saved since the last checkpoint")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
