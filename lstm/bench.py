"""Forward + backward time of the hand-written LSTM against torch.nn.LSTM, side by side, as ratios.

    python lstm/bench.py                       # the README's sizes
    python lstm/bench.py --sizes 64x100x256x1  # batch x length x hidden x layers
"""

import argparse
import statistics
import sys
import time

import torch

from lstm.model import HandwrittenLSTM
from lstm.train import UserError, pick_device

DEFAULT_SIZES = ["32x50x128x1", "64x100x256x1", "64x100x512x1", "64x100x128x2"]


def parse_size(text: str):
    """'64x100x256x1' -> (batch, length, hidden, layers)."""
    try:
        batch, length, hidden, layers = (int(part) for part in text.split("x"))
    except ValueError:
        raise UserError(f"size {text!r} is not batch x length x hidden x layers, e.g. 64x100x256x1") from None
    if min(batch, length, hidden, layers) <= 0:
        raise UserError(f"size {text!r} has a part that is not positive")
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


def main(argv=None):
    """Time both implementations at each size, alternating them so that machine load hits both alike."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="batch x length x hidden x layers")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per implementation (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    args = parser.parse_args(argv)
    try:
        if args.repeats <= 0:
            raise UserError("--repeats must be positive")
        sizes = [parse_size(size) for size in args.sizes]
        device = pick_device(args.device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    torch.manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} thread(s), median of {args.repeats} forward+backward passes")
    print(f"{'batch':>5} {'length':>6} {'hidden':>6} {'layers':>6} {'hand ms':>9} {'torch ms':>9} {'hand/torch':>10}")
    for batch, length, hidden, layers in sizes:
        reference = torch.nn.LSTM(hidden, hidden, layers, batch_first=True).to(device)
        handwritten = HandwrittenLSTM(hidden, hidden, layers).to(device)
        handwritten.load_state_dict(reference.state_dict())
        inputs = torch.randn(batch, length, hidden, device=device)  # (B, T, H)
        timings = {"hand": [], "torch": []}
        for repeat in range(args.repeats + 1):  # the first pass of each warms up and is not counted
            for name, module in (("hand", handwritten), ("torch", reference)):
                seconds = forward_backward_seconds(module, inputs, device)
                if repeat > 0:
                    timings[name].append(seconds)
        hand, torch_time = statistics.median(timings["hand"]), statistics.median(timings["torch"])
        print(f"{batch:>5} {length:>6} {hidden:>6} {layers:>6} {hand * 1e3:>9.1f} {torch_time * 1e3:>9.1f} "
              f"{hand / torch_time:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
