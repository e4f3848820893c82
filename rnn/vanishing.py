"""The vanishing gradient, measured: the norm of dL/dx_t against the distance from the loss, for tanh RNNs.

The loss reads only the last hidden state h_T, so the gradient reaching x_t has gone through T-t steps of
(7) in rnn/model.py: one multiplication by diag(1 - c²) W_hh per step. Its norm therefore shrinks (or grows)
roughly geometrically with the distance. The hand-written BPTT computes every dL/dx_t.
"""

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rnn.model import HandwrittenRNN  # noqa: E402
from rnn.runs import int_in_range  # noqa: E402


def input_gradient_norms(hidden_size, steps, batch_size, recurrent_gain=None, seed=0):
    """Mean over the batch of ||dL/dx_t|| for t = 0..T-1, with L = h_T · v; recurrent_gain: orthogonal W_hh × gain."""
    torch.manual_seed(seed)
    rnn = HandwrittenRNN(16, hidden_size).double()
    if recurrent_gain is not None:
        torch.nn.init.orthogonal_(rnn.weight_hh_l0, gain=recurrent_gain)
    inputs = torch.randn(batch_size, steps, 16, dtype=torch.float64, requires_grad=True)  # (B, T, I)
    _, final_hidden = rnn(inputs)  # (1, B, H)
    read_out = torch.randn(hidden_size, dtype=torch.float64) / hidden_size ** 0.5  # (H,)
    (final_hidden[-1] @ read_out).sum().backward()
    norms = inputs.grad.norm(dim=-1).mean(0)  # (T,)
    return norms.flip(0)  # index = distance from the last input, T - t (t counted from 1)


def main(argv=None):
    """Measure both families of curves, print the per-step decay, and draw the PNG."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int_in_range(11, 500), default=60, help="sequence length T, in [11, 500]")
    parser.add_argument("--batch-size", type=int_in_range(1, 128), default=64,
                        help="sequences averaged per curve, in [1, 128]")
    parser.add_argument("--out-dir", default="runs/rnn", help="folder for vanishing.png")
    parser.add_argument("--out", default=None,
                        help="write the PNG to this path instead (rnn/assets/vanishing.png is the README's figure)")
    arguments = parser.parse_args(argv)
    out = Path(arguments.out) if arguments.out else Path(arguments.out_dir) / "vanishing.png"
    if out.suffix.lower() != ".png":
        parser.error(f"--out {out} must name a .png file")
    existing = next(parent for parent in (out.parent, *out.parent.parents) if parent.exists())
    if out.is_dir() or not existing.is_dir():
        sys.exit(f"error: cannot write {out}: {out if out.is_dir() else existing} is a "
                 f"{'folder' if out.is_dir() else 'file'}")
    figure, (size_axis, gain_axis) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    print("curve                              |dL/dx| at distance 0, 10, 30   mean factor per step (first 10)")
    curves = [(size_axis, f"hidden {size}, torch default init", size, None) for size in (32, 128, 512)]
    curves += [(gain_axis, f"hidden 128, orthogonal W_hh x {gain}", 128, gain) for gain in (0.5, 1.0, 1.5, 3.0)]
    for axis, label, size, gain in curves:
        norms = input_gradient_norms(size, arguments.steps, arguments.batch_size, gain)  # (T,)
        axis.semilogy(range(arguments.steps), norms.clamp_min(1e-30).tolist(), label=label)
        factor = (norms[10] / norms[0]).item() ** (1 / 10)
        picks = [norms[d].item() for d in (0, 10, min(30, arguments.steps - 1))]
        print(f"{label:<35}" + " ".join(f"{value:9.2e}" for value in picks) + f"   {factor:.3f}")
    size_axis.set(title="default init: uniform(±1/sqrt(H))", xlabel="steps from the last input (T - t)",
                  ylabel="mean ||dL/dx_t||")
    gain_axis.set(title="orthogonal recurrent weights, scaled", xlabel="steps from the last input (T - t)")
    for axis in (size_axis, gain_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    figure.savefig(temporary, dpi=80, format="png")
    os.replace(temporary, out)  # a reader never sees half a picture
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
