"""Evaluate a model trained at context T on windows of T, 2T and 4T tokens, three ways of placing positions:

    plain RoPE       positions T..4T-1 give rotation angles the model never saw in training
    interpolation    positions are divided by the extension factor s, so every angle stays in the trained range
    ntk              the RoPE base grows by s^(d/(d-2)): slow channel pairs are interpolated, fast ones barely change

    python llm/long_context.py --checkpoint runs/llm/best.pt
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from llm.generate import check_tokenizer, load_model, pick_device
from llm.model import Llama, LlamaConfig
from llm.prepare import PrepareError, prepare, read_token_file, saved_hf_source


@torch.no_grad()
def loss_by_position(model: Llama, tokens: np.ndarray, length: int, max_windows: int, batch_size: int, device):
    """Mean cross-entropy at each position 0..length-1 of consecutive validation windows of `length` tokens."""
    count = min(max_windows, (len(tokens) - 1) // length)
    totals = torch.zeros(length)
    for first in range(0, count, batch_size):
        rows = [np.asarray(tokens[i * length : i * length + length + 1], dtype=np.int64)
                for i in range(first, min(count, first + batch_size))]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, L+1)
        logits, _ = model(block[:, :-1])  # (B, L, V)
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")
        totals += losses.sum(dim=0).cpu()  # (L,)
    return totals / count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    parser.add_argument("--factors", default="1,2,4", help="context lengths to test, as multiples of the trained T")
    parser.add_argument("--max-windows", type=int, default=48, help="validation windows per context length")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/llm", help="where long_context.json and .png go")
    args = parser.parse_args()
    try:
        factors = [int(f) for f in args.factors.split(",")]
        if min(factors) < 1 or args.max_windows < 1 or args.batch_size < 1:
            raise ValueError("--factors, --max-windows and --batch-size must be positive")
        device = pick_device(args.device)
        base_model, checkpoint = load_model(args.checkpoint, device)
        train_args = checkpoint.get("args", {})
        prepared = prepare(train_args.get("dataset", "wikitext-2"), checkpoint["config"]["vocab_size"],
                           Path(train_args.get("data_dir", "runs/llm/data")), train_args.get("text_file"),
                           log=lambda *a: None, hf=saved_hf_source(train_args))
        check_tokenizer(checkpoint, prepared.tokenizer_path, args.checkpoint)  # the same ids as in training
    except (ValueError, PrepareError) as error:
        sys.exit(f"error: {error}")
    tokens = read_token_file(prepared.token_files["valid"])
    trained = base_model.config.context_length
    if trained * max(factors) >= len(tokens):  # checked before a position table of that length is built
        sys.exit(f"error: --factors {max(factors)} asks for windows of {trained * max(factors)} tokens; "
                 f"the validation split has {len(tokens)}")
    results, curves = {}, {}
    for method in ("none", "interpolation", "ntk"):
        for factor in factors:
            length = trained * factor
            config = LlamaConfig(**{**checkpoint["config"], "rope_scaling": method, "rope_scale": float(factor)})
            model = Llama(config).to(device)
            model.load_state_dict(base_model.state_dict())
            model.set_rope_table(length)
            curve = loss_by_position(model, tokens, length, args.max_windows, args.batch_size, device)
            results[f"{method}@{length}"] = float(curve.mean())
            curves[(method, factor)] = curve
            print(f"{method:13s} context {length:5d} ({factor}T): mean loss {curve.mean():.4f}, "
                  f"positions beyond T {curve[trained:].mean() if factor > 1 else float('nan'):.4f}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "long_context.json").write_text(json.dumps({"trained_context": trained, "mean_loss": results}, indent=1))
    plot(curves, trained, max(factors), out_dir / "long_context.png")
    print(f"wrote {out_dir / 'long_context.png'}")


def plot(curves: dict, trained: int, factor: int, path: Path):
    """Loss against position in a window of factor*T tokens, one line per method, in bins of 16 positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    labels = {"none": "plain RoPE", "interpolation": "position interpolation", "ntk": "NTK-aware scaling"}
    def binned(curve: torch.Tensor):
        bins = len(curve) // 16
        return np.arange(bins) * 16 + 8, curve.numpy()[: bins * 16].reshape(bins, 16).mean(axis=1)

    for method in ("none", "interpolation", "ntk"):
        axis.plot(*binned(curves[(method, factor)]), label=f"{labels[method]} ({factor}T)")
    axis.plot(*binned(curves[("none", 1)]), "k--o", markersize=3, linewidth=1, label="window of T (as trained)")
    axis.axvline(trained, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("position in the window (tokens)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
