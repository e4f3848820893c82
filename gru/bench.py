"""Time the hand-written GRU against torch.nn.GRU (forward + backward), and the tagger's throughput in characters/s.

    python gru/bench.py                 # the README's table
    python gru/bench.py --repeats 3     # quicker, noisier
"""

import argparse
import statistics
import sys
import time

import torch

from data import DataError
from gru.corpus import TAGS, build_vocab, load_file
from gru.model import HandwrittenGRU, Tagger, TaggerConfig, TorchGRU
from gru.tagging import UserError, pick_device, predict

# (batch, length, input size, hidden size, bidirectional); the first row is the target size
GRU_SIZES = [(64, 100, 256, 256, False), (64, 100, 256, 256, True), (32, 45, 128, 128, True), (128, 45, 128, 128, True)]


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--tag-sentences", type=int, default=2000, help="test sentences tagged for throughput")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tag_sentences < 1:
        raise UserError("--repeats and --tag-sentences must be at least 1")
    return args


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(device, repeats: int, work, *arguments) -> float:
    """Median wall-clock seconds of work(*arguments) after one warm-up run."""
    work(*arguments)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work(*arguments)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_backward(module, inputs, lengths) -> None:
    """One forward and backward pass through a GRU."""
    outputs, _ = module(inputs, lengths)  # (B, T, D*H)
    outputs.sum().backward()


def bench_gru(device, repeats):
    """Forward + backward of both GRUs with the same weights, at each size."""
    print("GRU forward + backward (median of repeats)")
    print(f"{'batch':>5} {'length':>6} {'input':>5} {'hidden':>6} {'bidir':>5} {'handwritten ms':>14} "
          f"{'torch ms':>9} {'hand / torch':>12}")
    for batch, length, input_size, hidden_size, bidirectional in GRU_SIZES:
        reference = TorchGRU(input_size, hidden_size, 1, bidirectional).to(device)
        handwritten = HandwrittenGRU(input_size, hidden_size, 1, bidirectional).to(device)
        handwritten.load_state_dict(reference.state_dict())
        inputs = torch.randn(batch, length, input_size, device=device, requires_grad=True)  # (B, T, I)
        lengths = torch.full((batch,), length)

        hand = median_seconds(device, repeats, forward_backward, handwritten, inputs, lengths)
        torch_time = median_seconds(device, repeats, forward_backward, reference, inputs, lengths)
        print(f"{batch:>5} {length:>6} {input_size:>5} {hidden_size:>6} {bidirectional!s:>5} {hand * 1e3:>14.1f} "
              f"{torch_time * 1e3:>9.1f} {hand / torch_time:>12.2f}")


def bench_tagging(device, repeats, sentence_count):
    """Characters tagged per second on MSRA test sentences, for each GRU and output layer."""
    sentences = load_file("test", 100, log=lambda message: None)[:sentence_count]
    vocab = build_vocab(sentences, min_count=1)
    char_to_id = {char: i for i, char in enumerate(vocab)}
    characters = sum(len(chars) for chars, _ in sentences)
    print(f"\ntagging throughput, {len(sentences)} MSRA test sentences ({characters} characters), batches of 256")
    print(f"{'GRU':>12} {'output':>7} {'chars/s':>9}")
    for impl in ("handwritten", "torch"):
        for output in ("crf", "softmax"):
            torch.manual_seed(0)
            model = Tagger(TaggerConfig(len(vocab), len(TAGS), output=output, impl=impl)).to(device).eval()
            seconds = median_seconds(device, repeats, predict, model, sentences, char_to_id, TAGS, device)
            print(f"{impl:>12} {output:>7} {characters / seconds:>9.0f}")


def main(argv=None) -> int:
    """Run both benchmarks; user errors become one line on stderr."""
    try:
        args = parse_args(argv)
        device = pick_device(args.device)
        print(f"device {device}, {torch.get_num_threads()} thread(s)")
        bench_gru(device, args.repeats)
        bench_tagging(device, args.repeats, args.tag_sentences)
    except (UserError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
