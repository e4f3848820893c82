"""Side-by-side speed measurements of the default model, all in one run so the ratios are fair.

    python llm/bench.py     # matmul peaks; training tokens/s + MFU, eager/compiled x fp32/bf16; KV-cache generation

Numbers depend on the machine and its thread count (set OMP_NUM_THREADS to compare).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from llm.generate import generate, pick_device
from llm.model import KVCache, Llama, LlamaConfig
from llm.train import (
    autocast_context,
    build_parser,
    choose_dtype,
    compiler_problem,
    make_optimizer,
    measure_matmul_peak,
)


def default_config(attention_impl: str = "torch") -> tuple[LlamaConfig, argparse.Namespace]:
    """The model shape and optimizer settings of `python llm/train.py` with no flags."""
    args = build_parser().parse_args([])
    config = LlamaConfig(vocab_size=args.vocab_size, context_length=args.context_length, n_layers=args.n_layers,
                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_model=args.d_model,
                         attention_impl=attention_impl)
    return config, args


def training_throughput(config, args, device, dtype: torch.dtype | None, steps: int, batch_size=None) -> float:
    """Tokens per second of full optimizer steps (forward, backward, AdamW) on random tokens."""
    run = TrainingRun(config, args, device, "float32" if dtype is None else str(dtype).removeprefix("torch."), False,
                      batch_size)
    return run.tokens_per_second(steps)


class TrainingRun:
    """One way of training the default model (a precision, eager or compiled): full optimizer steps on random tokens.

    Built and warmed up once (for a compiled model the warm-up is the compile, timed separately), then timed
    in rounds that alternate with the other ways, so that a busy moment of the machine hits all of them alike.
    """

    def __init__(self, config, args, device, dtype_name: str, compiled: bool, batch_size=None):
        torch.manual_seed(0)
        self.device = device
        self.model = Llama(config).to(device)
        self.optimizer = make_optimizer(self.model, args)
        self.step_model = torch.compile(self.model) if compiled else self.model
        batch_size = batch_size or args.batch_size
        self.inputs = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
        self.targets = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
        self.autocast = autocast_context(device, dtype_name)
        start = time.perf_counter()
        self.step()  # the first step compiles (or warms up the allocator and kernels)
        self.step()
        synchronize(device)
        self.warmup_seconds = time.perf_counter() - start

    def step(self):
        with self.autocast:
            _, loss = self.step_model(self.inputs, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def tokens_per_second(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return steps * self.inputs.numel() / (time.perf_counter() - start)


def spread(values: list) -> dict:
    """Median and range of repeated measurements."""
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "runs": values}


def compare_training(config, train_args, device, steps: int, rounds: int, precisions, compile_too: bool) -> dict:
    """Training tokens/s and MFU of eager/compiled x each precision, in alternating rounds; ratios to fp32 eager."""
    peaks = {name: measure_matmul_peak(device, getattr(torch, name)) for name in precisions}
    flops_per_token = Llama(config).flops_per_token()
    ways = [(name, compiled) for compiled in ([False, True] if compile_too else [False]) for name in precisions]
    runs = {}
    for name, compiled in ways:
        label = f"{'compiled' if compiled else 'eager'}_{name}"
        runs[label] = TrainingRun(config, train_args, device, name, compiled)
        print(f"{label:17s}: built{' and compiled' if compiled else ''} in {runs[label].warmup_seconds:.1f} s "
              f"(two warm-up steps)", flush=True)
    speeds = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            speeds[label].append(run.tokens_per_second(steps))
    baseline = speeds["eager_float32"]
    results = {"matmul_peak_gflops": {name: peak / 1e9 for name, peak in peaks.items()},
               "flops_per_token": flops_per_token, "steps_per_round": steps, "rounds": rounds, "ways": {}}
    print("matmul peak (1024x1024): " + ", ".join(f"{n} {p / 1e9:.1f} GFLOP/s" for n, p in peaks.items()))
    print(f"{'training':17s}  tokens/s median [range]   vs eager fp32 [range]   MFU of fp32 peak, of own peak")
    for (name, compiled), (label, values) in zip(ways, speeds.items()):
        ratios = [value / base for value, base in zip(values, baseline)]  # same round, same moment of the machine
        tokens = spread(values)
        way = {"dtype": name, "compiled": compiled, "tokens_per_s": tokens, "ratio_to_eager_float32": spread(ratios),
               "mfu_of_float32_peak": tokens["median"] * flops_per_token / peaks["float32"],
               "mfu_of_own_peak": tokens["median"] * flops_per_token / peaks[name],
               "warmup_seconds": runs[label].warmup_seconds}
        results["ways"][label] = way
        ratio = way["ratio_to_eager_float32"]
        print(f"{label:17s}  {tokens['median']:7,.0f} [{tokens['min']:,.0f}-{tokens['max']:,.0f}]   "
              f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]   "
              f"{way['mfu_of_float32_peak']:6.1%}, {way['mfu_of_own_peak']:6.1%}")
    return results


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
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimizer steps per way and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing (ratios: median and range)")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--gen-lengths", default="128,512,1024", help="comma-separated numbers of new tokens")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 measurements")
    parser.add_argument("--out", default="runs/llm/bench.json", help="where to write the measurements as JSON")
    args = parser.parse_args()
    try:
        lengths = [int(n) for n in args.gen_lengths.split(",")]
        if args.train_steps < 1 or args.rounds < 1 or min(lengths) < 1:
            raise ValueError
    except ValueError:
        sys.exit("error: --train-steps and --rounds must be positive and --gen-lengths a list of positive integers")
    try:
        device = pick_device(args.device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    config, train_args = default_config()
    results = {"device": str(device), "threads": torch.get_num_threads(), "config": config.to_dict()}
    flops_per_token = Llama(config).flops_per_token()
    print(f"device {device}, {torch.get_num_threads()} threads; default model, {flops_per_token / 1e6:.1f} MFLOP/token")

    precisions = ["float32"]
    if not args.skip_bf16:
        choice, reason = choose_dtype(device)  # on a CPU without bf16 units, bf16 is a slow emulation: skipped
        results["auto_dtype"] = {"choice": choice, "measurement": reason}
        if choice == "bfloat16" or device.type != "cpu":
            precisions.append("bfloat16")
        else:
            print(f"bf16 skipped: --dtype auto picks {choice} here ({reason})")
    problem = "" if args.skip_compile else compiler_problem(device.type)
    if problem:
        print(f"compiled runs skipped: {problem}")
    results["compile_problem"] = problem
    results["training"] = compare_training(config, train_args, device, args.train_steps, args.rounds, precisions,
                                           compile_too=not (args.skip_compile or problem))
    results["train_tokens_per_s_float32"] = results["training"]["ways"]["eager_float32"]["tokens_per_s"]["median"]
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
