"""Put language-model runs side by side: validation bpc against steps in one PNG, and a table of their summaries.

    python lstm/compare.py runs/lstm runs/lstm-torch runs/lstm-rnn   # -> runs/lstm/lm_curves.png
    python lstm/compare.py runs/lstm runs/lstm-torch runs/lstm-rnn --out lstm/assets/lm_curves.png
    python lstm/compare.py runs/lstm runs/lstm-rnn --context-out lstm/assets/context.png  # + loss by position
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data import DataError  # noqa: E402
from lstm.eval import load_language_model, loss_by_position  # noqa: E402
from lstm.runs import RunError, positive_int  # noqa: E402
from lstm.tasks import load_corpus  # noqa: E402
from lstm.train import fail  # noqa: E402

CONTEXT_BANDS = [(0, 1), (1, 2), (2, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 400)]


def read_run(run_dir: Path):
    """The validation records and the final summary that train.py wrote into run_dir."""
    records, summary = [], None
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "final" in record:
                summary = record["final"]
            else:
                records.append((record["step"], float(record["validation_bpc"])))
        if summary is not None:
            summary = {key: summary[key] for key in ("cell", "impl", "hidden_size", "parameters", "test_bpc",
                                                     "best_validation_bpc", "train_seconds")} | summary
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{run_dir / 'metrics.jsonl'} is not a language-model log written by train.py") from None
    if summary is None:
        raise ValueError(f"{run_dir} holds no finished run")
    return records, summary


def run_label(run_dir: Path, summary: dict) -> str:
    """'LSTM (handwritten), lr 0.01': the model, and its learning rate (the folder's name if the run lacks it)."""
    detail = f"lr {summary['lr']:g}" if "lr" in summary else run_dir.name
    return f"{summary['cell'].upper()} ({summary['impl']}), {detail}"


def context_curves(runs, window: int) -> list[list[float]]:
    """Each run's best.pt scored by position in windows read from a zero state, averaged over CONTEXT_BANDS."""
    bands = [band for band in CONTEXT_BANDS if band[1] <= window]
    curves = []
    for run_dir, _, _ in runs:
        model, checkpoint = load_language_model(run_dir / "best.pt", torch.device("cpu"))
        corpus = load_corpus(checkpoint["books"])
        curve = loss_by_position(model, torch.tensor(corpus.encode(corpus.test)), window, window // 8)  # (W,)
        curves.append([curve[a:b].mean().item() for a, b in bands])
    return curves


def plot_curves(runs, labels, path: Path):
    """Validation bpc against step for each run, with its test bpc in the legend; prints a table too."""
    print("| run | model | hidden | parameters | test bpc | best validation bpc | wall-clock |")
    print("|---|---|---|---|---|---|---|")
    figure, axes = plt.subplots(figsize=(6, 4))
    for (run_dir, records, summary), label in zip(runs, labels):
        minutes = summary["train_seconds"] / 60
        print(f"| {run_dir} | {label} | {summary['hidden_size']} | {summary['parameters']:,} | "
              f"{summary['test_bpc']:.4f} | {summary['best_validation_bpc']:.4f} | {minutes:.1f} min |")
        axes.plot([step for step, _ in records], [bpc for _, bpc in records], marker="o", markersize=3,
                  label=f"{label}: test {summary['test_bpc']:.3f}")
    axes.set_xlabel("step (64 x 100 characters each)")
    axes.set_ylabel("validation bits per character")
    axes.set_title("character language model on three Austen novels")
    axes.grid(alpha=0.3)
    save_figure(figure, axes, path)


def plot_context(runs, labels, curves, path: Path, window: int):
    """Test bpc against the number of characters of context, for each run's best checkpoint; prints a table too."""
    figure, axes = plt.subplots(figsize=(6, 4))
    bands = [band for band in CONTEXT_BANDS if band[1] <= window]
    print("\n| run | " + " | ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in bands) + " |")
    print("|---|" + "---|" * len(bands))
    for (run_dir, _, _), label, band_means in zip(runs, labels, curves):
        print(f"| {run_dir} | " + " | ".join(f"{mean:.3f}" for mean in band_means) + " |")
        middles = [((a + 1) * b) ** 0.5 for a, b in bands]  # geometric middle of characters-of-context a+1 .. b
        axes.plot(middles, band_means, marker="o", markersize=3, label=label)
    axes.set_xscale("log")
    axes.set_ylim(top=4.0)
    axes.set_xlabel("characters of context (read from a zero state)")
    axes.set_ylabel("test bits per character")
    axes.set_title("how much history each model uses")
    axes.grid(alpha=0.3, which="both")
    save_figure(figure, axes, path)


def save_figure(figure, axes, path: Path):
    """The legend, then the PNG (its folder made if missing) and a line saying where it went."""
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def png_folder_made(flag: str, path: Path) -> Path:
    """Check an output picture before any work: a .png name, its folder made if missing; else one line and exit 1."""
    if path.suffix.lower() != ".png" or path.is_dir():
        fail(f"{flag} must name a .png file, not {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"{flag} {path}: cannot create the folder {path.parent} ({error.strerror})")
    return path


def main(argv=None):
    """Read, print the table, plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="out-dirs of finished train.py language-model runs")
    parser.add_argument("--out", help="where to write the PNG (default: lm_curves.png in the first run's folder)")
    parser.add_argument("--context-out", help="also score each run's best.pt by position in windows read from a "
                                              "zero state, and draw that curve into this PNG")
    parser.add_argument("--window", type=positive_int, default=400, help="window length for --context-out (>= 2)")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run (default: model and learning rate)")
    args = parser.parse_args(argv)
    if args.window < 2:
        parser.error("--window must be at least 2")
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.run_dirs)} runs")
    out = png_folder_made("--out", Path(args.out) if args.out else Path(args.run_dirs[0]) / "lm_curves.png")
    if args.context_out:
        png_folder_made("--context-out", Path(args.context_out))
    try:
        runs = [(Path(run_dir), *read_run(Path(run_dir))) for run_dir in args.run_dirs]
        # Scored before anything is drawn, so that a bad checkpoint or window leaves no half-written output.
        curves = context_curves(runs, args.window) if args.context_out else None
    except (RunError, DataError, OSError, ValueError) as error:
        fail(str(error))
    labels = args.labels or [run_label(run_dir, summary) for run_dir, _, summary in runs]
    plot_curves(runs, labels, out)
    if args.context_out:
        plot_context(runs, labels, curves, Path(args.context_out), args.window)


if __name__ == "__main__":
    main()
