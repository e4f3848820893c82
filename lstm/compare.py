"""Put language-model runs side by side: validation bpc against steps in one PNG, and a table of their summaries.

    python lstm/compare.py runs/lstm runs/lstm-torch runs/lstm-rnn --out lstm/assets/lm_curves.png
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run_dir: Path):
    """The validation records and the final summary that train.py wrote into run_dir."""
    records, summary = [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "final" in record:
            summary = record["final"]
        else:
            records.append(record)
    if summary is None:
        raise ValueError(f"{run_dir} holds no finished run")
    return records, summary


def main(argv=None):
    """Read, print the table, plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="out-dirs of finished train.py language-model runs")
    parser.add_argument("--out", default="runs/lm_curves.png", help="where to write the PNG")
    args = parser.parse_args(argv)
    try:
        runs = [(Path(run_dir), *read_run(Path(run_dir))) for run_dir in args.run_dirs]
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("| run | model | hidden | parameters | test bpc | best validation bpc | wall-clock |")
    print("|---|---|---|---|---|---|---|")
    figure, axes = plt.subplots(figsize=(6, 4))
    for run_dir, records, summary in runs:
        label = f"{summary['cell'].upper()} ({summary['impl']})"
        minutes = summary["train_seconds"] / 60
        print(f"| {run_dir} | {label} | {summary['hidden_size']} | {summary['parameters']:,} | "
              f"{summary['test_bpc']:.4f} | {summary['best_validation_bpc']:.4f} | {minutes:.1f} min |")
        axes.plot([r["step"] for r in records], [r["validation_bpc"] for r in records], marker="o", markersize=3,
                  label=f"{label}: test {summary['test_bpc']:.3f}")
    axes.set_xlabel("step (64 x 100 characters each)")
    axes.set_ylabel("validation bits per character")
    axes.set_title("character language model on three Austen novels")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
