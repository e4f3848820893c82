"""Forward + backward time of the hand-written LSTM, with its own backward and with autograd's, against torch.nn.LSTM.

    python lstm/bench.py                       # the README's sizes
    python lstm/bench.py --sizes 64x100x256x1  # batch x length x hidden x layers
    python lstm/bench.py --runs 3              # the whole measurement three times: median and range of each ratio

The three are timed side by side, alternating pass by pass, so that machine load hits them alike:
  hand      HandwrittenLSTM, each layer's backward written out (LSTMLayerFunction, equations (9)-(11))
  autograd  HandwrittenLSTM, autograd recording the same forward code step by step
  torch     torch.nn.LSTM (oneDNN's fused kernels on the CPU)
"""

import argparse
import statistics
import time

import torch

from lstm.model import HandwrittenLSTM
from lstm.runs import RunError, pick_device, positive_int
from lstm.train import fail

DEFAULT_SIZES = ["32x50x128x1", "64x100x256x1", "64x100x512x1", "64x100x128x2"]
IMPLEMENTATIONS = ("hand", "autograd", "torch")


def parse_size(text: str):
    """'64x100x256x1' -> (batch, length, hidden, layers)."""
    try:
        batch, length, hidden, layers = (int(part) for part in text.split("x"))
    except ValueError:
        raise RunError(f"size {text!r} is not batch x length x hidden x layers, e.g. 64x100x256x1") from None
    if min(batch, length, hidden, layers) <= 0:
        raise RunError(f"size {text!r} has a part that is not positive")
    if batch * length * hidden * max(layers, 4) > 2**31:
        raise RunError(f"size {text!r} is too large to time here")
    return batch, length, hidden, layers


def forward_backward_seconds(module, inputs, device) -> float:
    """Wall-clock seconds of one forward and backward pass (outputs summed into a scalar)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs, _ = module(inputs)
    outputs.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_size(batch, length, hidden, layers, repeats, device) -> dict:
    """Median seconds of `repeats` forward+backward passes of each implementation at one size."""
    reference = torch.nn.LSTM(hidden, hidden, layers, batch_first=True).to(device)
    modules = {"torch": reference}
    for name, backward in (("hand", "handwritten"), ("autograd", "autograd")):
        modules[name] = HandwrittenLSTM(hidden, hidden, layers, backward=backward).to(device)
        modules[name].load_state_dict(reference.state_dict())
    inputs = torch.randn(batch, length, hidden, device=device)  # (B, T, H)
    timings = {name: [] for name in IMPLEMENTATIONS}
    for repeat in range(repeats + 1):  # the first pass of each warms up and is not counted
        for name in IMPLEMENTATIONS:
            seconds = forward_backward_seconds(modules[name], inputs, device)
            if repeat > 0:
                timings[name].append(seconds)
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv=None):
    """Time the three at each size; with --runs > 1, the median and range of each ratio over the runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="batch x length x hidden x layers")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed passes per implementation in one run (their median is the run's time)")
    parser.add_argument("--runs", type=positive_int, default=1, help="independent runs; ratios get median and range")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(size) for size in args.sizes]
        device = pick_device(args.device)
    except RunError as error:
        fail(str(error))
    torch.manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} thread(s); each run: median of {args.repeats} "
          f"forward+backward passes per implementation; {args.runs} run(s)")
    print(f"{'batch':>5} {'length':>6} {'hidden':>6} {'layers':>6} {'hand ms':>9} {'autograd ms':>11} "
          f"{'torch ms':>9} {'hand/autograd':>13} {'hand/torch':>10} {'autograd/torch':>14}")
    for batch, length, hidden, layers in sizes:
        runs = [time_size(batch, length, hidden, layers, args.repeats, device) for _ in range(args.runs)]
        milliseconds = {name: statistics.median(run[name] for run in runs) * 1e3 for name in IMPLEMENTATIONS}
        ratios = []
        for top, bottom in (("hand", "autograd"), ("hand", "torch"), ("autograd", "torch")):
            values = [run[top] / run[bottom] for run in runs]
            spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
            ratios.append(f"{statistics.median(values):.2f}x{spread}")
        print(f"{batch:>5} {length:>6} {hidden:>6} {layers:>6} {milliseconds['hand']:>9.1f} "
              f"{milliseconds['autograd']:>11.1f} {milliseconds['torch']:>9.1f} {ratios[0]:>13} {ratios[1]:>10} "
              f"{ratios[2]:>14}", flush=True)


if __name__ == "__main__":
    main()
