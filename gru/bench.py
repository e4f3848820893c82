"""Time one GRU layer three ways (forward + backward), and the tagger's throughput in characters/s.

    python gru/bench.py                 # the README's tables
    python gru/bench.py --repeats 3     # quicker, noisier
    python gru/bench.py --skip-tagging  # only the GRU layer
    python gru/bench.py --skip-layer    # only the tagging throughput

The three GRUs share their weights: the hand-written GRU with its hand-written backward (GRULayerFunction),
the same hand-written forward differentiated by autograd, and torch.nn.GRU.
"""

import argparse
import statistics
import sys
import time

import torch

from data import DataError
from gru.corpus import TAGS, build_vocab, load_file
from gru.model import HandwrittenGRU, Tagger, TaggerConfig, TorchGRU
from gru.runs import RunError, pick_device, positive_int
from gru.tagging import predict

# (batch, length, input size, hidden size, bidirectional); the first row is about the default tagger's shape: batch 32,
# 45 characters (a training sentence has 42.8 on average, and a length-sorted batch of 32 pads to 43.7), embedding
# 128, hidden 128 per direction, both directions
GRU_SIZES = [(32, 45, 128, 128, True), (128, 45, 128, 128, True), (64, 100, 256, 256, False), (64, 100, 256, 256, True)]
GRUS = ("handwritten", "autograd", "torch")  # GRULayerFunction, autograd through the same forward, torch.nn.GRU


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed runs per measurement (median and range are reported)")
    parser.add_argument("--tag-sentences", type=positive_int, default=2000, help="test sentences tagged for throughput")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps")
    parser.add_argument("--skip-tagging", action="store_true", help="time only the GRU layer")
    parser.add_argument("--skip-layer", action="store_true", help="time only the tagging throughput")
    return parser


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_of(device, work, *arguments) -> float:
    """Wall-clock seconds of one call of work(*arguments)."""
    synchronize(device)
    started = time.perf_counter()
    work(*arguments)
    synchronize(device)
    return time.perf_counter() - started


def forward_backward(module, inputs, lengths) -> None:
    """One forward and backward pass through a GRU."""
    outputs, _ = module(inputs, lengths)  # (B, T, D*H)
    outputs.sum().backward()


def spread(values, style: str = ".2f") -> str:
    """median [min-max] of a few measurements."""
    return f"{statistics.median(values):{style}} [{min(values):{style}}-{max(values):{style}}]"


def bench_gru(device, repeats):
    """Forward + backward of one GRU layer, three ways with the same weights, at each size.

    Each repeat times the three one after another, in a rotating order, so that a slow moment of the machine
    hits all three alike; the ratios are taken within a repeat and reported as median [min-max] over repeats.
    """
    print(f"GRU layer forward + backward, ms: median [min-max] of {repeats} repeats")
    print(f"{'batch':>5} {'length':>6} {'input':>5} {'hidden':>6} {'bidir':>5} {'handwritten ms':>24} "
          f"{'autograd ms':>24} {'torch.nn.GRU ms':>24} {'hand / autograd':>18} {'hand / torch':>18}")
    for batch, length, input_size, hidden_size, bidirectional in GRU_SIZES:
        reference = TorchGRU(input_size, hidden_size, 1, bidirectional).to(device)
        modules = {"torch": reference}
        for backward in ("handwritten", "autograd"):
            modules[backward] = HandwrittenGRU(input_size, hidden_size, 1, bidirectional, backward=backward).to(device)
            modules[backward].load_state_dict(reference.state_dict())
        inputs = torch.randn(batch, length, input_size, device=device, requires_grad=True)  # (B, T, I)
        lengths = torch.full((batch,), length)
        times = {name: [] for name in GRUS}
        for name in GRUS:  # one warm-up each
            forward_backward(modules[name], inputs, lengths)
        for repeat in range(repeats):
            for name in GRUS[repeat % 3 :] + GRUS[: repeat % 3]:
                times[name].append(seconds_of(device, forward_backward, modules[name], inputs, lengths))
        hand_autograd = [hand / other for hand, other in zip(times["handwritten"], times["autograd"])]
        hand_torch = [hand / other for hand, other in zip(times["handwritten"], times["torch"])]
        milliseconds = {name: spread([1e3 * value for value in times[name]]) for name in GRUS}
        print(f"{batch:>5} {length:>6} {input_size:>5} {hidden_size:>6} {bidirectional!s:>5} "
              f"{milliseconds['handwritten']:>24} {milliseconds['autograd']:>24} {milliseconds['torch']:>24} "
              f"{spread(hand_autograd):>18} {spread(hand_torch):>18}")


def bench_tagging(device, repeats, sentence_count):
    """Characters tagged per second on MSRA test sentences, for each GRU and output layer.

    As in bench_gru, each repeat times the four taggers one after another in a rotating order, and the ratios are
    taken within a repeat. The two output layers of one GRU share its work, so CRF / softmax is the cost of Viterbi
    (the same code for both GRUs), and the two GRUs with one output layer differ only in the GRU.
    """
    sentences = load_file("test", 100, log=lambda message: None)[:sentence_count]
    vocab = build_vocab(sentences, min_count=1)
    char_to_id = {char: i for i, char in enumerate(vocab)}
    characters = sum(len(chars) for chars, _ in sentences)
    taggers = {}
    for impl in ("handwritten", "torch"):
        for output in ("crf", "softmax"):
            torch.manual_seed(0)
            taggers[impl, output] = Tagger(TaggerConfig(len(vocab), len(TAGS), output=output, impl=impl)).to(device)
    speeds = {key: [] for key in taggers}
    for model in taggers.values():  # one warm-up each
        predict(model, sentences, char_to_id, TAGS, device)
    order = list(taggers)
    for repeat in range(repeats):
        for key in order[repeat % 4 :] + order[: repeat % 4]:
            seconds = seconds_of(device, predict, taggers[key], sentences, char_to_id, TAGS, device)
            speeds[key].append(characters / seconds)
    print(f"\ntagging throughput, {len(sentences)} MSRA test sentences ({characters} characters), batches of 256, "
          f"characters/s: median [min-max] of {repeats} repeats")
    print(f"{'GRU':>12} {'CRF (Viterbi)':>24} {'softmax (argmax)':>24} {'CRF / softmax':>18}")
    for impl in ("handwritten", "torch"):
        crf, softmax = speeds[impl, "crf"], speeds[impl, "softmax"]
        print(f"{impl:>12} {spread(crf, '.0f'):>24} {spread(softmax, '.0f'):>24} "
              f"{spread([a / b for a, b in zip(crf, softmax)]):>18}")
    for output in ("crf", "softmax"):
        ratios = [hand / reference for hand, reference in zip(speeds["handwritten", output], speeds["torch", output])]
        print(f"{output}: hand-written / torch.nn.GRU characters/s {spread(ratios)}")


def main(argv=None) -> int:
    """Run both benchmarks; user errors become one line on stderr."""
    try:
        args = build_parser().parse_args(argv)
        device = pick_device(args.device)
        print(f"device {device}, {torch.get_num_threads()} thread(s)")
        if not args.skip_layer:
            bench_gru(device, args.repeats)
        if not args.skip_tagging:
            bench_tagging(device, args.repeats, args.tag_sentences)
    except (RunError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
