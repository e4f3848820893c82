"""The smallest RNN task: read "hello" one character at a time and predict "elloh", printing progress.

The two l's of "hello" must be mapped to different characters ("l" then "o"): the input alone cannot
tell them apart, only the hidden state, which remembers what came before, can.
"""

import argparse

import torch
import torch.nn.functional as F

from rnn.model import HandwrittenRNN, TorchRNN
from rnn.runs import int_in_range, non_negative_int


def main(argv=None):
    """Train a 1-layer RNN with a per-step linear read-out on one sequence and print its predictions."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="hello", help="input string, read one character per step")
    parser.add_argument("--target", default="elloh", help="output string, same length as --source")
    parser.add_argument("--impl", choices=["handwritten", "torch"], default="handwritten", help="which RNN to use")
    parser.add_argument("--hidden-size", type=int_in_range(1, 4096), default=8, help="size of the hidden state")
    parser.add_argument("--steps", type=int_in_range(1, 100_000), default=30, help="optimisation steps")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    arguments = parser.parse_args(argv)
    if not arguments.source or len(arguments.source) != len(arguments.target):
        parser.error("--source and --target must be non-empty and of the same length")
    torch.manual_seed(arguments.seed)
    characters = sorted(set(arguments.source + arguments.target))
    index = {character: i for i, character in enumerate(characters)}
    inputs = F.one_hot(torch.tensor([[index[c] for c in arguments.source]]), len(characters)).float()  # (1, T, V)
    targets = torch.tensor([index[c] for c in arguments.target])  # (T,)
    rnn_class = HandwrittenRNN if arguments.impl == "handwritten" else TorchRNN
    rnn = rnn_class(len(characters), arguments.hidden_size)
    read_out = torch.nn.Linear(arguments.hidden_size, len(characters))
    optimizer = torch.optim.Adam([*rnn.parameters(), *read_out.parameters()], lr=0.05)
    for step in range(1, arguments.steps + 1):
        outputs, _ = rnn(inputs)  # (1, T, H)
        logits = read_out(outputs[0])  # (T, V)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 3 == 0:
            prediction = "".join(characters[i] for i in logits.argmax(-1).tolist())
            print(f"step {step:3d}  loss {loss.item():.4f}  {arguments.source!r} -> {prediction!r}")
    with torch.no_grad():
        hidden_states = rnn(inputs)[0][0]  # (T, H)
    print("hidden state after each character (first 4 units):")
    for character, state in zip(arguments.source, hidden_states):
        print(f"  {character!r}: " + " ".join(f"{value:+.2f}" for value in state[:4].tolist()))


if __name__ == "__main__":
    main()
