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
from cnn.model import CNNConfig, build_model, manual_forward_backward, sgd_momentum_update  # noqa: E402
from data import DataError  # noqa: E402


def parse_arguments(argv=None):
    """The command line; the defaults reproduce the README's results table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", default="handwritten", choices=["handwritten", "torch"],
                        help="hand-written layers (layers.py) or the torch.nn reference")
    parser.add_argument("--backprop", default="autograd", choices=["autograd", "manual"],
                        help="autograd: loss.backward() through the hand-written Functions; manual: no autograd, "
                             "the hand-written backward chained by model.manual_forward_backward (handwritten only)")
    parser.add_argument("--conv-backward", default="col2im", choices=["col2im", "rot180"],
                        help="how the hand-written conv computes dJ/da: im2col order or the literal rot180 form")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the 55,000 training images")
    parser.add_argument("--batch-size", type=int, default=128, help="images per SGD step")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps of linear learning-rate warm-up")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum mu")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay lambda")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout probability before the last layer")
    parser.add_argument("--pooling", default="max", choices=["max", "avg"], help="max or average pooling")
    parser.add_argument("--augment-shift", type=int, default=2, help="random shift of up to this many pixels (0: off)")
    parser.add_argument("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    parser.add_argument("--validation-images", type=int, default=0, help="use only N validation images (0: all 5,000)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between training-loss records")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four MNIST IDX files (default: fetched by the data helper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, shuffling and dropout")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/cnn", help="folder for checkpoints, metrics.jsonl and plots")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    arguments = parser.parse_args(argv)
    for name in ["epochs", "batch_size", "log_every"]:
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ["lr", "momentum", "weight_decay", "augment_shift", "train_images", "validation_images",
                 "warmup_steps"]:
        if getattr(arguments, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= arguments.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if arguments.backprop == "manual" and arguments.impl != "handwritten":
        parser.error("--backprop manual needs --impl handwritten")
    return arguments


def pick_device(name):
    """Resolve --device auto to cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: no MPS device is available")
    return torch.device(name)


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


def save_checkpoint(path, state):
    """torch.save to a temporary file beside `path`, then rename: an interrupted save never corrupts `path`."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, device):
    """torch.load with weights_only=True; an unreadable file becomes a ValueError with one clear line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__})") from None


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


def train(arguments):
    """The training loop; returns the final metrics record."""
    device = pick_device(arguments.device)
    out_dir = Path(arguments.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    start_epoch, start_batch, best_accuracy = 0, 0, -1.0
    torch.manual_seed(arguments.seed)
    augment_generator = torch.Generator().manual_seed(arguments.seed + 1)

    last_path = out_dir / "last.pt"
    if arguments.resume:
        if not last_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        checkpoint = load_checkpoint(last_path, device)
        if checkpoint.get("run_settings") != run_settings:
            raise ValueError(f"--resume: {last_path} was trained with {checkpoint.get('run_settings')}, "
                             f"not {run_settings}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, start_batch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
        best_accuracy = checkpoint["best_validation_accuracy"]
        torch.set_rng_state(checkpoint["torch_rng_state"])
        augment_generator.set_state(checkpoint["augment_rng_state"])
        print(f"resumed from {last_path} at epoch {start_epoch + 1}, batch {start_batch}")
    elif (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()

    def state(epoch, batch_in_epoch):
        """Everything a checkpoint holds (tensors, dicts, numbers, strings only)."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "run_settings": run_settings,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_validation_accuracy": best_accuracy,
                "torch_rng_state": torch.get_rng_state(), "augment_rng_state": augment_generator.get_state(),
                "arguments": vars(arguments)}

    records = []
    metrics_path = out_dir / "metrics.jsonl"
    if arguments.resume and metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    model.train()
    epoch_records = [r for r in records if r["kind"] == "epoch"]
    epoch, completed_batches, record = start_epoch, start_batch, epoch_records[-1] if epoch_records else {}
    if start_epoch >= arguments.epochs:
        print(f"{last_path} has already trained {start_epoch} of {arguments.epochs} epochs; nothing to do")
    try:
        for epoch in range(start_epoch, arguments.epochs):
            epoch_start = time.time()
            # the order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches
            order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(
                arguments.seed * 1000 + epoch)).to(device)
            first_batch = start_batch if epoch == start_epoch else 0
            completed_batches = first_batch
            running_loss, running_count, correct, seen = 0.0, 0, 0, 0
            progress = tqdm(range(first_batch, steps_per_epoch), desc=f"epoch {epoch + 1}/{arguments.epochs}",
                            initial=first_batch, total=steps_per_epoch, leave=False)
            for batch_index in progress:
                step = epoch * steps_per_epoch + batch_index
                indices = order[batch_index * arguments.batch_size : (batch_index + 1) * arguments.batch_size]
                images = random_shift(train_images[indices], arguments.augment_shift, augment_generator)
                labels = train_labels[indices]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total_steps, arguments.lr, arguments.warmup_steps)
                if arguments.backprop == "manual":
                    # no autograd: hand-written backward, hand-written SGD update on torch.optim.SGD's buffers
                    loss, logits, gradients = manual_forward_backward(model, images, labels)
                    parameters = dict(model.named_parameters())
                    velocities = momentum_buffers(optimizer)
                    sgd_momentum_update(parameters, gradients, {n: velocities[p] for n, p in parameters.items()},
                                        optimizer.param_groups[0]["lr"], arguments.momentum, arguments.weight_decay)
                else:
                    logits = model(images)  # (B, 10)
                    loss = model.loss(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                completed_batches = batch_index + 1  # for the checkpoint on Ctrl-C
                running_loss += loss.item() * labels.shape[0]
                running_count += labels.shape[0]
                correct += (logits.argmax(dim=1) == labels).sum().item()
                seen += labels.shape[0]
                if (step + 1) % arguments.log_every == 0:
                    records.append({"kind": "step", "step": step + 1, "train_loss": running_loss / running_count})
                    with metrics_path.open("a") as file:
                        file.write(json.dumps(records[-1]) + "\n")
                    progress.set_postfix(loss=f"{running_loss / running_count:.4f}")
                    running_loss, running_count = 0.0, 0
            validation_loss, validation_accuracy = evaluate(model, validation_images, validation_labels)
            record = {"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                      "train_accuracy": correct / max(1, seen), "validation_loss": validation_loss,
                      "validation_accuracy": validation_accuracy, "seconds": time.time() - epoch_start}
            records.append(record)
            with metrics_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1}: train acc {100 * record['train_accuracy']:.2f}%  validation loss "
                  f"{validation_loss:.4f} acc {100 * validation_accuracy:.2f}%  ({record['seconds']:.0f} s)")
            if validation_accuracy > best_accuracy:
                best_accuracy = validation_accuracy
                save_checkpoint(out_dir / "best.pt", state(epoch + 1, 0))
            save_checkpoint(last_path, state(epoch + 1, 0))
            plot_curves(records, out_dir / "curves.png")
    except KeyboardInterrupt:
        if completed_batches < steps_per_epoch:
            save_checkpoint(last_path, state(epoch, completed_batches))
        else:
            save_checkpoint(last_path, state(epoch + 1, 0))
        print(f"\ninterrupted: saved {last_path}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    return record


def main(argv=None):
    """Entry point: user errors end with one line on stderr and exit status 1."""
    arguments = parse_arguments(argv)
    try:
        record = train(arguments)
    except (DataError, MnistError, FileNotFoundError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
