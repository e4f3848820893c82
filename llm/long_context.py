"""Evaluate a model trained at context T on windows of T, 2T and 4T tokens, three ways of placing positions:

    plain RoPE       positions T..4T-1 give rotation angles the model never saw in training
    interpolation    positions are divided by the extension factor s, so every angle stays in the trained range
    ntk              the RoPE base grows by s^(d/(d-2)): slow channel pairs are interpolated, fast ones barely change

    python llm/long_context.py --checkpoint runs/llm/best.pt

Each context length cuts the whole validation split into consecutive windows (663 windows of 4T = 512 tokens for
the default model), so every curve scores the same text. The loss at each position is averaged over the windows
and over bands of 16 positions; the figure shades two standard errors of each band's mean.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llm.checkpoint import check_tokenizer, load_model
from llm.model import Llama, LlamaConfig
from llm.prepare import PrepareError, prepare, read_token_file, saved_hf_source
from llm.runs import pick_device, positive_int, positive_int_list

BAND = 16  # positions averaged together in the figure and in the order check
METHODS = ("none", "interpolation", "ntk")
LABELS = {"none": "plain RoPE", "interpolation": "position interpolation", "ntk": "NTK-aware scaling"}


@torch.no_grad()
def loss_by_position(model: Llama, tokens: np.ndarray, length: int, max_windows: int | None, batch_size: int,
                     device) -> torch.Tensor:
    """Cross-entropy at each position 0..length-1 of consecutive windows of `length` tokens: (windows, length)."""
    count = (len(tokens) - 1) // length
    count = min(count, max_windows) if max_windows else count
    losses = []
    for first in tqdm(range(0, count, batch_size), desc=f"windows of {length}", unit="batch", file=sys.stderr,
                      dynamic_ncols=True, leave=False):
        rows = [np.asarray(tokens[i * length : i * length + length + 1], dtype=np.int64)
                for i in range(first, min(count, first + batch_size))]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, L+1)
        logits, _ = model(block[:, :-1])  # (B, L, V)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")
        losses.append(nll.cpu())  # (B, L)
    return torch.cat(losses)  # (windows, L)


def band_means(losses: torch.Tensor) -> torch.Tensor:
    """(windows, length) -> (windows, length // BAND): each window's mean loss in every band of BAND positions."""
    bands = losses.size(1) // BAND
    return losses[:, : bands * BAND].reshape(losses.size(0), bands, BAND).mean(dim=2)


def order_agreement(per_window: dict, first_band: int) -> tuple[int, int]:
    """In how many bands from first_band on the order of the methods is the same in both halves of the windows.

    The halves are the first and the second half of the split: two independent samples of text, as two runs on
    different data would be.
    """
    windows = next(iter(per_window.values())).size(0)
    halves = [slice(0, windows // 2), slice(windows // 2, windows)]
    orders = []
    for half in halves:
        means = torch.stack([per_window[method][half].mean(dim=0) for method in METHODS])  # (methods, bands)
        orders.append(means.argsort(dim=0))  # (methods, bands): the ranking in each band
    agree = (orders[0] == orders[1]).all(dim=0)[first_band:]  # (bands beyond T,)
    return int(agree.sum()), int(agree.numel())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    parser.add_argument("--factors", type=positive_int_list, default=[1, 2, 4],
                        help="context lengths to test, as multiples of the trained T (comma-separated)")
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="at most this many validation windows per context length (default: the whole split)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out-dir", default="runs/llm", help="where long_context.json and .png go")
    args = parser.parse_args()
    try:
        factors = sorted(set(args.factors))
        existing = next(folder for folder in (Path(args.out_dir), *Path(args.out_dir).parents) if folder.exists())
        if not existing.is_dir():  # checked before the work; the folder itself is made when there is a result
            raise ValueError(f"--out-dir {args.out_dir} cannot be made: {existing} is a file")
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
    for factor in factors:
        for method in METHODS if factor > 1 else ("none",):  # at factor 1 every method is plain RoPE
            length = trained * factor
            config = LlamaConfig(**{**checkpoint["config"], "rope_scaling": method, "rope_scale": float(factor)})
            model = Llama(config).to(device)
            model.load_state_dict(base_model.state_dict())
            model.set_rope_table(length)
            losses = loss_by_position(model, tokens, length, args.max_windows, args.batch_size, device)
            curves[(method, factor)] = losses
            beyond = float(losses[:, trained:].mean()) if factor > 1 else None
            results[f"{method}@{length}"] = {"windows": losses.size(0), "mean_loss": float(losses.mean()),
                                             "beyond_trained_loss": beyond}
            print(f"{LABELS[method]:23s} context {length:5d} ({factor}T), {losses.size(0)} windows: mean loss "
                  f"{losses.mean():.4f}" + (f", positions beyond T {beyond:.4f}" if factor > 1 else ""))
    longest = max(factors)
    report = {"trained_context": trained, "band": BAND, "results": results}
    if longest > 1:
        per_window = {method: band_means(curves[(method, longest)]) for method in METHODS}
        agree, bands = order_agreement(per_window, trained // BAND)
        report["order_agreement_beyond_trained"] = {"bands_agreeing": agree, "bands": bands}
        print(f"order of the three schemes beyond T ({longest}T windows, bands of {BAND} positions): the same in "
              f"both halves of the split in {agree} of {bands} bands")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "long_context.json").write_text(json.dumps(report, indent=1))
    where = "the whole validation split" if args.max_windows is None else "the first validation windows"
    plot(curves, trained, longest, where, out_dir / "long_context.png")
    print(f"wrote {out_dir / 'long_context.png'}")


def plot(curves: dict, trained: int, factor: int, where: str, path: Path):
    """Loss against position in a window of factor*T tokens, one line per method, in bands of BAND positions,
    each shaded by two standard errors of its mean over the windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.8), dpi=100)

    def draw(losses: torch.Tensor, label: str, **style):
        per_window = band_means(losses).numpy()  # (windows, bands)
        mean = per_window.mean(axis=0)
        error = 2 * per_window.std(axis=0, ddof=1) / np.sqrt(per_window.shape[0])
        centres = np.arange(len(mean)) * BAND + BAND / 2
        line, = axis.plot(centres, mean, label=f"{label}, {per_window.shape[0]} windows", **style)
        axis.fill_between(centres, mean - error, mean + error, color=line.get_color(), alpha=0.2, linewidth=0)

    if factor > 1:
        for method in METHODS:
            draw(curves[(method, factor)], f"{LABELS[method]} ({factor}T)", linewidth=1.5)
    draw(curves[("none", 1)], "window of T (as trained)", color="black", linestyle="--", marker="o", markersize=3,
         linewidth=1)
    axis.axvline(trained, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel(f"position in the window (tokens; bands of {BAND})")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title(f"Loss by position, {where} (shading: ±2 standard errors)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
