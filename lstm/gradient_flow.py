"""Why the LSTM remembers: the norm of dL/dx_t against the distance from x_t to the loss, LSTM beside tanh RNN.

    python lstm/gradient_flow.py --run-dir runs/lstm-adding   # after `train.py --task adding`

The loss L is the adding problem's squared error, taken at the last step. The same measurement is made on freshly
initialised models and on the models trained at --length, whose checkpoints train.py wrote into --run-dir.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lstm.model import AddingConfig, AddingModel  # noqa: E402
from lstm.runs import RunError, load_checkpoint, positive_int, seed_int  # noqa: E402
from lstm.tasks import adding_batch  # noqa: E402
from lstm.train import MAX_BATCH_ELEMENTS, fail  # noqa: E402


def input_gradient_norms(model: AddingModel, inputs, targets) -> torch.Tensor:
    """Mean over the batch of ||dL/dx_t||, for every step t: (T,)."""
    inputs = inputs.clone().requires_grad_(True)
    loss = F.mse_loss(model(inputs), targets)
    (gradient,) = torch.autograd.grad(loss, inputs)  # (B, T, 2)
    return gradient.norm(dim=-1).mean(dim=0)  # (T,)


@torch.no_grad()
def forget_gate_per_unit(model: AddingModel, inputs) -> torch.Tensor:
    """Each unit's forget gate f_t in the first LSTM layer, averaged over the batch and the steps: (H,)."""
    parameters = dict(model.recurrent.named_parameters())
    key = next(name for name in parameters if name.endswith("weight_ih_l0")).removesuffix("weight_ih_l0")
    weight_ih, weight_hh = parameters[key + "weight_ih_l0"], parameters[key + "weight_hh_l0"]
    bias = parameters[key + "bias_ih_l0"] + parameters[key + "bias_hh_l0"]
    hidden_size = weight_hh.shape[1]
    outputs, _ = model.recurrent(inputs)  # (B, T, H)
    previous_hidden = torch.cat([torch.zeros_like(outputs[:, :1]), outputs[:, :-1]], dim=1)  # h_{t-1}: (B, T, H)
    gates = inputs @ weight_ih.t() + previous_hidden @ weight_hh.t() + bias  # (B, T, 4H)
    return torch.sigmoid(gates[..., hidden_size : 2 * hidden_size]).mean(dim=(0, 1))  # the forget block, eq. (2)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/lstm-adding", help="where train.py --task adding wrote checkpoints")
    parser.add_argument("--length", type=positive_int, default=100,
                        help="sequence length the trained models are read from (at least 2)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="sequences the norms are averaged over")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for the fresh models and the batch")
    args = parser.parse_args(argv)
    if args.length < 2:
        parser.error("--length must be at least 2")
    return args


def load_trained(args) -> tuple[dict, dict]:
    """The trained LSTM's and RNN's checkpoints at --length, and their configs; one line and exit if unusable."""
    run_dir = Path(args.run_dir)
    try:
        if args.batch_size * args.length * 2 > MAX_BATCH_ELEMENTS:
            raise RunError(f"--batch-size {args.batch_size} x --length {args.length} is more than this script builds")
        trained = {cell: load_checkpoint(run_dir / f"adding-{cell}-{args.length}-best.pt", "lstm", ("model", "config"))
                   for cell in ("lstm", "rnn")}
    except RunError as error:
        missing = str(error).startswith("checkpoint ") and str(error).endswith("does not exist")
        fail(f"{error}{' (run `python lstm/train.py --task adding` first)' if missing else ''}")
    try:
        configs = {cell: AddingConfig.from_checkpoint(trained[cell]["config"]) for cell in ("lstm", "rnn")}
    except (TypeError, AttributeError):
        fail(f"the checkpoints in {run_dir} are not readable lstm checkpoints (their config is not an adding one)")
    return trained, configs


def measure(args, trained: dict, configs: dict) -> tuple[dict, dict]:
    """The input-gradient norms (and the LSTM's forget gates) of fresh and trained models, printed as measured."""
    inputs, targets = adding_batch(args.batch_size, args.length, torch.Generator().manual_seed(args.seed + 7))
    inputs, targets = inputs.double(), targets.double()
    results, curves = {}, {}
    for stage in ("initialised", "trained"):
        for cell in ("lstm", "rnn"):
            torch.manual_seed(args.seed)
            model = AddingModel(configs[cell]).double()  # float64: the RNN's far gradients underflow float32
            if stage == "trained":
                try:
                    model.load_state_dict(trained[cell]["model"])
                except (RuntimeError, TypeError, AttributeError):
                    fail(f"{args.run_dir}/adding-{cell}-{args.length}-best.pt is not a readable lstm checkpoint "
                         f"(its weights do not fit its config)")
            norms = input_gradient_norms(model, inputs, targets)  # (T,)
            curves[(stage, cell)] = norms
            entry = {"gradient_norm_at_distance_0": norms[-1].item(),
                     f"gradient_norm_at_distance_{args.length - 1}": norms[0].item(),
                     "ratio_far_to_near": (norms[0] / norms[-1]).item()}
            if cell == "lstm":
                forget = forget_gate_per_unit(model, inputs)  # (H,)
                entry["mean_forget_gate"] = forget.mean().item()
                entry["units_with_forget_gate_above_0.95"] = int((forget > 0.95).sum())
                entry["largest_unit_forget_gate"] = forget.max().item()
            results[f"{stage}_{cell}"] = entry
            print(f"{stage:>11} {cell}: " + ", ".join(f"{key} {value:.3g}" for key, value in entry.items()))
    return results, curves


def plot_gradient_flow(curves: dict, length: int, path: Path) -> None:
    """The gradient norms against the distance to the loss, fresh models beside trained ones."""
    distance = torch.arange(length - 1, -1, -1)  # steps from x_t to the last step, where the loss is
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, stage in zip(axes, ("initialised", "trained")):
        for cell, label in (("lstm", "LSTM"), ("rnn", "tanh RNN")):
            axis.plot(distance, curves[(stage, cell)], label=label)
        axis.set_yscale("log")
        axis.set_xlabel("distance T - t from the input to the loss")
        axis.set_title(f"{stage}" + (f" (adding problem, T = {length})" if stage == "trained" else ""))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean ||dL/dx_t||")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    """Measure, print, plot."""
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    trained, configs = load_trained(args)
    results, curves = measure(args, trained, configs)
    plot_gradient_flow(curves, args.length, run_dir / "gradient_flow.png")
    (run_dir / "gradient_flow.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {run_dir / 'gradient_flow.png'} and gradient_flow.json")


if __name__ == "__main__":
    main()
