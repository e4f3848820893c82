"""Compare vocabulary sizes at equal training compute, in bits per byte (which does not depend on the tokenizer).

    python llm/vocab_sweep.py                         # 4096, 8192, 16384, 32000; writes runs/llm-vocab/vocab.json

A larger vocabulary packs more bytes into each token (fewer positions to predict) but costs more per token
(the output projection is V x d) and puts more parameters into the embedding. Each run gets the same training
FLOPs: its step count is the base step count scaled by FLOPs-per-token of the 4096 model over its own.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from llm.checkpoint import load_model
from llm.eval import split_metrics
from llm.model import Llama, LlamaConfig
from llm.prepare import PrepareError, prepare
from llm.runs import positive_int


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", default="4096,8192,16384,32000", help="comma-separated vocabulary sizes")
    parser.add_argument("--base-steps", type=positive_int, default=150,
                        help="optimizer steps of the first vocabulary size")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step")
    parser.add_argument("--out-dir", default="runs/llm-vocab", help="one sub-folder per vocabulary size")
    parser.add_argument("--data-dir", default="runs/llm/data", help="where tokenizers and token files are kept")
    args = parser.parse_args()
    try:
        sizes = [int(v) for v in args.vocab_sizes.split(",")]
        if min(sizes) < 300 or args.base_steps < 1:
            raise ValueError
    except ValueError:
        sys.exit("error: --vocab-sizes must be integers >= 300 and --base-steps positive")
    shape = dict(d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128)
    flops = {v: Llama(LlamaConfig(vocab_size=v, **shape)).flops_per_token() for v in sizes}
    rows = []
    for vocab in sizes:
        steps = max(1, round(args.base_steps * flops[sizes[0]] / flops[vocab]))
        out_dir = Path(args.out_dir) / str(vocab)
        command = [sys.executable, "llm/train.py", "--vocab-size", str(vocab), "--max-steps", str(steps),
                   "--batch-size", str(args.batch_size), "--warmup-steps", str(max(1, steps // 10)),
                   "--eval-every", str(steps), "--out-dir", str(out_dir), "--data-dir", args.data_dir,
                   "--num-samples", "0", "--no-final-eval"]
        if (out_dir / "last.pt").is_file():  # a sweep run again continues (or simply reuses) each saved run
            command.append("--resume")
        print(" ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            sys.exit(f"error: training with vocabulary {vocab} failed")
        try:
            prepared = prepare("wikitext-2", vocab, Path(args.data_dir), log=lambda *a: None)
        except PrepareError as error:
            sys.exit(f"error: {error}")
        model, _ = load_model(str(out_dir / "best.pt"), torch.device("cpu"))
        metrics = split_metrics(model, prepared.token_files["valid"], prepared.text_files["valid"], 128, 16, "cpu")
        row = {"vocab_size": vocab, "steps": steps, "train_tokens": steps * args.batch_size * 128,
               "train_bytes": round(steps * args.batch_size * 128 * metrics["bytes_per_token"]),
               "flops_per_token": flops[vocab], "parameters": model.num_parameters(),
               "embedding_share": 1 - model.num_parameters(False) / model.num_parameters(),
               "bytes_per_token": metrics["bytes_per_token"], "val_loss": metrics["loss"],
               "val_bits_per_byte": metrics["bits_per_byte"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out_dir, "vocab.json").write_text(json.dumps(rows, indent=1))
    print("| vocabulary | steps | training bytes seen | bytes/token | embedding share | val bits/byte |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['vocab_size']:,} | {row['steps']} | {row['train_bytes'] / 1e6:.2f} M "
              f"| {row['bytes_per_token']:.2f} | {row['embedding_share']:.0%} | {row['val_bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
