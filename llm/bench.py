"""Side-by-side speed measurements of the default model, all in one run so the ratios are fair.

    python llm/bench.py     # matmul peak, training tokens/s + MFU (fp32, bf16), generation with/without KV cache

Numbers depend on the machine and its thread count (set OMP_NUM_THREADS to compare).
"""

import argparse
import json
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from llm.generate import generate, pick_device
from llm.model import KVCache, Llama, LlamaConfig
from llm.train import build_parser, make_optimizer, measure_matmul_peak


def default_config(attention_impl: str = "torch") -> tuple[LlamaConfig, argparse.Namespace]:
    """The model shape and optimizer settings of `python llm/train.py` with no flags."""
    args = build_parser().parse_args([])
    config = LlamaConfig(vocab_size=args.vocab_size, context_length=args.context_length, n_layers=args.n_layers,
                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_model=args.d_model,
                         attention_impl=attention_impl)
    return config, args


def training_throughput(config, args, device, dtype: torch.dtype | None, steps: int, batch_size=None) -> float:
    """Tokens per second of full optimizer steps (forward, backward, AdamW) on random tokens."""
    torch.manual_seed(0)
    model = Llama(config).to(device)
    optimizer = make_optimizer(model, args)
    batch_size = batch_size or args.batch_size
    inputs = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
    targets = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    for step in range(steps + 1):  # one warm-up step
        if step == 1:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * inputs.numel() / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generation_throughput(model, new_tokens: int, use_cache: bool, device) -> float:
    """New tokens per second, greedy, from a 16-token prompt."""
    prompt = list(range(10, 26))
    if model.rope_cos.size(0) < len(prompt) + new_tokens:
        model.set_rope_table(len(prompt) + new_tokens)  # only speed is measured here, not quality past the context
    synchronize(device)
    start = time.perf_counter()
    produced = generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
    synchronize(device)
    return len(produced) / (time.perf_counter() - start)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimizer steps per precision")
    parser.add_argument("--gen-lengths", default="128,512,1024", help="comma-separated numbers of new tokens")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 measurements")
    parser.add_argument("--out", default="runs/llm/bench.json", help="where to write the measurements as JSON")
    args = parser.parse_args()
    try:
        lengths = [int(n) for n in args.gen_lengths.split(",")]
        if args.train_steps < 1 or min(lengths) < 1:
            raise ValueError
    except ValueError:
        sys.exit("error: --train-steps must be positive and --gen-lengths a list of positive integers")
    device = pick_device(args.device)
    config, train_args = default_config()
    results = {"device": str(device), "threads": torch.get_num_threads(), "config": config.to_dict()}
    flops_per_token = Llama(config).flops_per_token()
    print(f"device {device}, {torch.get_num_threads()} threads; default model, {flops_per_token / 1e6:.1f} MFLOP/token")

    precisions = [("float32", None)] + ([] if args.skip_bf16 else [("bfloat16", torch.bfloat16)])
    for name, dtype in precisions:
        peak = measure_matmul_peak(device, dtype or torch.float32, repeats=8 if dtype is None else 2)
        slow = dtype is not None and device.type == "cpu"  # bf16 without bf16 hardware: one small step is enough
        tokens_per_second = training_throughput(config, train_args, device, dtype, 1 if slow else args.train_steps,
                                                batch_size=4 if slow else None)
        mfu = tokens_per_second * flops_per_token / peak
        results[f"matmul_peak_gflops_{name}"] = peak / 1e9
        results[f"train_tokens_per_s_{name}"] = tokens_per_second
        results[f"mfu_{name}"] = mfu
        fp32_peak = results["matmul_peak_gflops_float32"] * 1e9
        print(f"{name:8s}: matmul peak {peak / 1e9:7.1f} GFLOP/s | training {tokens_per_second:8,.0f} tokens/s "
              f"| MFU {mfu:.1%} of this precision's peak, {tokens_per_second * flops_per_token / fp32_peak:.1%} "
              f"of the fp32 peak")
    handwritten_config, _ = default_config("handwritten")
    handwritten = training_throughput(handwritten_config, train_args, device, None, args.train_steps)
    results["train_tokens_per_s_float32_handwritten_attention"] = handwritten
    print(f"hand-written attention (fp32): {handwritten:,.0f} tokens/s "
          f"({handwritten / results['train_tokens_per_s_float32']:.2f}x the fused path)")

    torch.manual_seed(0)
    model = Llama(config).to(device).eval()
    for new_tokens in lengths:
        cached = generation_throughput(model, new_tokens, True, device)
        recomputed = generation_throughput(model, new_tokens, False, device)
        cache_bytes = KVCache(config, 1, 16 + new_tokens, "meta").num_bytes()
        results[f"generate_{new_tokens}"] = {"kv_cache_tokens_per_s": cached, "no_cache_tokens_per_s": recomputed,
                                             "speedup": cached / recomputed, "kv_cache_bytes": cache_bytes}
        print(f"generate {new_tokens:5d} new tokens: KV cache {cached:7.1f} tok/s | recompute {recomputed:7.1f} tok/s "
              f"| speed-up {cached / recomputed:5.1f}x | cache {cache_bytes / 2**20:.2f} MiB")
    results["peak_memory_mb"] = peak_memory_mb(device)
    print(f"peak memory of this process: {results['peak_memory_mb']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
