"""Time the hand-written layers against torch at the model's own shapes, then one training epoch of each.

    python cnn/bench.py            # OMP_NUM_THREADS sets the thread count; the README used 1
"""

import argparse
import functools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cnn import layers
from cnn.mnist import MnistError, load_split
from cnn.model import CNNConfig, build_model, manual_forward_backward, sgd_momentum_update
from cnn.runs import int_in_range, positive_int
from data import DataError


def parse_arguments(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int_in_range(1, 55000), default=128,
                        help="batch size of the layer timings and the epoch")
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed repetitions per layer (the median is shown)")
    parser.add_argument("--epoch-images", type=int_in_range(0, 55000), default=55000,
                        help="training images in the timed epoch (0: skip)")
    parser.add_argument("--json", action="store_true", help="also print all timings as one JSON object")
    return parser.parse_args(argv)


def median_milliseconds(function, repeats):
    """Median wall-clock time of `function()` in milliseconds, after two warm-up calls."""
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def forward_backward(layer, inputs):
    """A closure running layer(*inputs) forward and backward with a fixed upstream gradient."""
    upstream = torch.randn_like(layer(*inputs))

    def run():
        output = layer(*inputs)
        torch.autograd.grad(output, [tensor for tensor in inputs if tensor.requires_grad], upstream)

    return run


def layer_timings(batch_size, repeats):
    """Hand-written conv and max-pool forward+backward against torch.nn.functional, at the model's shapes."""
    rows = []
    # (name, in channels, size, out channels, kernel, padding, needs dJ/dinput): conv1 sees the image, so training
    # never asks for its input gradient; conv2 does
    for name, channels, size, out_channels, kernel, padding, input_gradient in [
        ("conv1 1->32 5x5 on 28x28", 1, 28, 32, 5, 2, False),
        ("conv2 32->64 3x3 on 14x14", 32, 14, 64, 3, 1, True),
    ]:
        images = torch.randn(batch_size, channels, size, size, requires_grad=input_gradient)
        weight = torch.randn(out_channels, channels, kernel, kernel, requires_grad=True)
        bias = torch.randn(out_channels, requires_grad=True)
        inputs = (images, weight, bias)
        torch_conv = functools.partial(F.conv2d, stride=1, padding=padding)
        reference = median_milliseconds(forward_backward(torch_conv, inputs), repeats)
        # without dJ/dinput the two methods run the same code, so conv1 is timed once
        for method in ["col2im", "rot180"] if input_gradient else ["col2im"]:
            our_conv = functools.partial(layers.Conv2dFunction.apply, stride=1, padding=padding,
                                         input_gradient_method=method)
            ours = median_milliseconds(forward_backward(our_conv, inputs), repeats)
            rows.append({"layer": f"{name} ({method})", "handwritten_ms": ours, "torch_ms": reference})
    for name, channels, size in [("max-pool 2x2 on 32x28x28", 32, 28), ("max-pool 2x2 on 64x14x14", 64, 14)]:
        inputs = (torch.randn(batch_size, channels, size, size, requires_grad=True),)
        reference = median_milliseconds(forward_backward(lambda x: F.max_pool2d(x, 2), inputs), repeats)
        ours = median_milliseconds(forward_backward(lambda x: layers.MaxPool2dFunction.apply(x, 2, 2), inputs), repeats)
        rows.append({"layer": name, "handwritten_ms": ours, "torch_ms": reference})
    return rows


def epoch_seconds(implementation, backprop, images, labels, batch_size):
    """Wall-clock seconds of one training epoch (SGD with momentum, no validation)."""
    torch.manual_seed(0)
    model = build_model(CNNConfig(), implementation).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    velocities = {name: torch.zeros_like(parameter) for name, parameter in model.named_parameters()}
    order = torch.randperm(images.shape[0])
    start = time.perf_counter()
    for first in range(0, images.shape[0], batch_size):
        indices = order[first : first + batch_size]
        if backprop == "manual":
            _, _, gradients = manual_forward_backward(model, images[indices], labels[indices])
            sgd_momentum_update(dict(model.named_parameters()), gradients, velocities, 0.01, 0.9)
        else:
            loss = model.loss(model(images[indices]), labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def main(argv=None):
    """Print the layer table, the epoch table and their ratios."""
    arguments = parse_arguments(argv)
    print(f"threads: {torch.get_num_threads()}, batch size {arguments.batch_size}")
    rows = layer_timings(arguments.batch_size, arguments.repeats)
    print(f"{'forward + backward':34s} {'hand-written':>13s} {'torch':>9s} {'ratio':>7s}")
    for row in rows:
        row["ratio"] = row["handwritten_ms"] / row["torch_ms"]
        print(f"{row['layer']:34s} {row['handwritten_ms']:10.1f} ms {row['torch_ms']:6.1f} ms {row['ratio']:6.2f}x")
    epochs = {}
    if arguments.epoch_images:
        try:
            images, labels = load_split("train", limit=arguments.epoch_images)
        except (DataError, MnistError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        for implementation, backprop in [("torch", "autograd"), ("handwritten", "autograd"), ("handwritten", "manual")]:
            epochs[f"{implementation}/{backprop}"] = epoch_seconds(
                implementation, backprop, images, labels, arguments.batch_size)
        reference = epochs["torch/autograd"]
        print(f"one epoch of {images.shape[0]} images:")
        for name, seconds in epochs.items():
            print(f"  {name:22s} {seconds:7.1f} s  {seconds / reference:5.2f}x torch")
    if arguments.json:
        print(json.dumps({"layers": rows, "epoch_seconds": epochs}))


if __name__ == "__main__":
    main()
