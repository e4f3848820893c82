"""Forward+backward time of the hand-written RNN (its own BPTT) against torch.nn.RNN, side by side, as ratios."""

import argparse
import sys
import time

import torch

from rnn.model import HandwrittenRNN, TorchRNN
from rnn.runs import pick_device, positive_int

# (batch, length, input size, hidden size, layers, bidirectional); the fourth row is the classifier's own shape.
SIZES = [(64, 20, 64, 64, 1, False), (16, 50, 64, 128, 1, False), (64, 20, 64, 256, 1, False),
         (64, 20, 64, 256, 1, True), (64, 20, 64, 256, 2, False), (64, 20, 64, 512, 1, False)]


def time_forward_backward(rnn, inputs, lengths, repeats):
    """Median seconds of one forward+backward pass (after two warm-up passes)."""
    timings = []
    for repeat in range(repeats + 2):
        start = time.perf_counter()
        outputs, final_hidden = rnn(inputs, lengths)
        (outputs.sum() + final_hidden.sum()).backward()
        if inputs.is_cuda:
            torch.cuda.synchronize()
        if repeat >= 2:
            timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def main(argv=None):
    """Time both implementations on every size, with and without padding, and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed passes per size (the median is reported)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (cuda, then mps, then cpu)")
    arguments = parser.parse_args(argv)
    try:
        device = pick_device(arguments.device)
    except ValueError as exception:
        sys.exit(f"error: {exception}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}")
    print(f"{'batch':>5} {'len':>4} {'hidden':>6} {'layers':>6} {'bidir':>5} {'lengths':>8} "
          f"{'hand ms':>8} {'torch ms':>9} {'ratio':>6}")
    for batch, length, input_size, hidden, layers, bidirectional in SIZES:
        for padded in (False, True):
            torch.manual_seed(0)
            reference = TorchRNN(input_size, hidden, layers, bidirectional).to(device)
            handwritten = HandwrittenRNN(input_size, hidden, layers, bidirectional).to(device)
            handwritten.load_state_dict(reference.state_dict())
            inputs = torch.randn(batch, length, input_size, device=device, requires_grad=True)  # (B, T, I)
            # Padded: lengths spread over 1..T, the kind of batch the names classifier sees.
            lengths = torch.randint(1, length + 1, (batch,)).index_fill_(0, torch.tensor([0]), length)  # (B,)
            lengths = lengths if padded else None
            hand = time_forward_backward(handwritten, inputs, lengths, arguments.repeats)
            library = time_forward_backward(reference, inputs, lengths, arguments.repeats)
            print(f"{batch:>5} {length:>4} {hidden:>6} {layers:>6} {str(bidirectional):>5} "
                  f"{'varied' if padded else 'full':>8} {hand * 1e3:>8.2f} {library * 1e3:>9.2f} "
                  f"{hand / library:>5.2f}x")


if __name__ == "__main__":
    main()
