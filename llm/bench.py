"""Side-by-side speed measurements of the default model, all in one run so the ratios are fair.

    python llm/bench.py     # matmul peaks; training tokens/s + MFU, eager/compiled x fp32/bf16; KV-cache generation
    python llm/bench.py --chat   # the chat on SmolLM2-135M-Instruct: decoding against transformers, the server

Numbers depend on the machine and its thread count (set OMP_NUM_THREADS to compare).
"""

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm.generate import generate
from llm.model import KVCache, Llama, LlamaConfig
from llm.reference_models import REFERENCE_MODELS, ReferenceShape, import_model_file, training_flops_per_token
from llm.runs import pick_device, positive_int, positive_int_list
from llm.train import (
    autocast_context,
    automatic_attention,
    choose_dtype,
    compiler_problem,
    make_optimizer,
    measure_matmul_peak,
)
from llm.train import parse_args as parse_training_args


def default_config(attention_impl: str = "fused") -> tuple[LlamaConfig, argparse.Namespace]:
    """The model shape and optimizer settings of `python llm/train.py` with no flags."""
    args = parse_training_args([])
    config = LlamaConfig(vocab_size=args.vocab_size, context_length=args.context_length, n_layers=args.n_layers,
                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_model=args.d_model,
                         attention_impl=attention_impl)
    return config, args


class TrainingRun:
    """One way of training the default model (a precision, eager or compiled): full optimizer steps on random tokens.

    Built and warmed up once (for a compiled model the warm-up is the compile, timed separately), then timed
    in rounds that alternate with the other ways, so that a busy moment of the machine hits all of them alike.
    """

    def __init__(self, config, args, device, dtype_name: str, compiled: bool, batch_size=None, model=None):
        torch.manual_seed(0)
        self.device = device
        self.model = (model or Llama(config)).to(device)  # any model whose forward(tokens, targets) -> (_, loss)
        self.optimizer = make_optimizer(self.model, args)
        self.step_model = torch.compile(self.model) if compiled else self.model
        batch_size = batch_size or args.batch_size
        self.inputs = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
        self.targets = torch.randint(0, config.vocab_size, (batch_size, config.context_length), device=device)
        self.autocast = autocast_context(device, dtype_name)
        start = time.perf_counter()
        self.step()  # the first step compiles (or warms up the allocator and kernels)
        loss = self.step()
        synchronize(device)
        self.warmup_seconds = time.perf_counter() - start
        self.finite = bool(torch.isfinite(loss))  # a way whose loss is not finite has no speed worth reporting

    def step(self) -> torch.Tensor:
        with self.autocast:
            _, loss = self.step_model(self.inputs, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def tokens_per_second(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.finite = self.finite and bool(torch.isfinite(loss))
        return steps * self.inputs.numel() / seconds


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
        # each way with the attention `python llm/train.py` would train it with (--attention-impl auto)
        way_config = LlamaConfig(**(config.to_dict() | {"attention_impl": automatic_attention(compiled, device.type)}))
        runs[label] = TrainingRun(way_config, train_args, device, name, compiled)
        print(f"{label:17s}: built{' and compiled' if compiled else ''} in {runs[label].warmup_seconds:.1f} s "
              f"(two warm-up steps), {way_config.attention_impl} attention", flush=True)
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
        way = {"dtype": name, "compiled": compiled, "attention_impl": runs[label].model.config.attention_impl,
               "tokens_per_s": tokens, "ratio_to_eager_float32": spread(ratios),
               "mfu_of_float32_peak": tokens["median"] * flops_per_token / peaks["float32"],
               "mfu_of_own_peak": tokens["median"] * flops_per_token / peaks[name],
               "warmup_seconds": runs[label].warmup_seconds}
        way["loss_finite"] = runs[label].finite
        results["ways"][label] = way
        if not runs[label].finite:
            print(f"{label:17s}  the loss is not finite: no result")
            continue
        ratio = way["ratio_to_eager_float32"]
        print(f"{label:17s}  {tokens['median']:7,.0f} [{tokens['min']:,.0f}-{tokens['max']:,.0f}]   "
              f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]   "
              f"{way['mfu_of_float32_peak']:6.1%}, {way['mfu_of_own_peak']:6.1%}")
    return results


def reference_builders(config, originals: dict) -> tuple[dict, dict, list]:
    """Ours (fused and hand-written attention), the two rebuilt references, and any original model.py given:
    name -> a function that builds the model; the references' shape; the pairs whose speed ratio is reported."""
    shape = ReferenceShape(vocab_size=config.vocab_size, context_length=config.context_length,
                           d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                           n_kv_heads=config.n_kv_heads, norm_eps=config.norm_eps, rope_theta=config.rope_theta)
    handwritten = LlamaConfig(**(config.to_dict() | {"attention_impl": "handwritten"}))
    ours = {"ours": lambda: Llama(config), "ours, hand-written attention": lambda: Llama(handwritten)}
    references = {name: functools.partial(build, shape) for name, build in REFERENCE_MODELS.items()}
    pairs = [(mine, theirs) for mine in ours for theirs in references] + [("ours", "ours, hand-written attention")]
    builders = ours | references
    for name, module in originals.items():  # a reader's copy of the original model.py, timed beside the rebuild
        if module is not None:
            builders[f"{name} (original)"] = functools.partial(REFERENCE_MODELS[name], shape, module)
            pairs.append((name, f"{name} (original)"))
    return builders, {"shape": shape}, pairs


def compare_references(config, train_args, device, steps: int, rounds: int, ways, originals: dict) -> dict:
    """Our model against llama2.c's and nanoGPT's at the same shape, and against itself with the hand-written
    attention: training tokens/s, side by side.

    ways: (dtype name, compiled) pairs; originals: {"nanoGPT": path or None, "llama2.c": path or None}. Same
    optimizer, same batch and random tokens for all; each round times every model and way once, so the ratios
    compare the same moment of the machine.
    """
    builders, info, pairs = reference_builders(config, originals)
    runs, results = {}, {"ways": {}, "models": {}}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        flops = model.flops_per_token() if isinstance(model, Llama) else training_flops_per_token(model, info["shape"])
        results["models"][name] = {"parameters": sum(p.numel() for p in model.parameters()),
                                   "flops_per_token": flops}
        for dtype_name, compiled in ways:
            torch.manual_seed(0)
            runs[(name, dtype_name, compiled)] = TrainingRun(config, train_args, device, dtype_name, compiled,
                                                             model=build())
    speeds = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            speeds[key].append(run.tokens_per_second(steps))
    for name, info in results["models"].items():
        print(f"same shape: {name}: {info['parameters']:,} parameters, {info['flops_per_token'] / 1e6:.1f} MFLOP/token")
    for dtype_name, compiled in ways:
        label = f"{'compiled' if compiled else 'eager'}_{dtype_name}"
        way_speeds = {name: speeds[(name, dtype_name, compiled)] for name in builders}
        way_finite = {name: runs[(name, dtype_name, compiled)].finite for name in builders}
        results["ways"][label] = reference_ratios(label, way_speeds, way_finite, pairs)
    return results


def reference_ratios(label: str, speeds: dict, finite: dict, pairs: list) -> dict:
    """One way's tokens/s of every model, and each pair's ratio taken within a round (the same moment of the
    machine)."""
    way = {"tokens_per_s": {name: spread(values) for name, values in speeds.items()}, "loss_finite": finite}
    print(f"{label:17s}  tokens/s: " + ", ".join(
        f"{name} {tokens['median']:,.0f}" if finite[name] else f"{name}: loss not finite, no result"
        for name, tokens in way["tokens_per_s"].items()))
    for mine, theirs in pairs:
        if not (finite[mine] and finite[theirs]):
            continue
        ratios = spread([a / b for a, b in zip(speeds[mine], speeds[theirs])])
        way[f"{mine} / {theirs}"] = ratios
        print(f"{'':17s}  {mine} / {theirs}: {ratios['median']:.2f}x [{ratios['min']:.2f}-{ratios['max']:.2f}]")
    return way


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


# The shape of HuggingFaceTB/SmolLM2-135M (its config.json), filled with random weights for the speed comparison
SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                          rms_norm_eps=1e-5, max_position_embeddings=8192)


class TimeStamps:
    """A transformers streamer that notes when each new token arrives (the first put() is the prompt)."""

    def __init__(self, stamps: list):
        self.stamps, self.prompt_seen = stamps, False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def hf_generation_comparison(new_tokens: int, repeats: int, dtype_names) -> dict:
    """Greedy tokens/s of our model + KV cache against transformers' generate, on the same random weights."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from llm.hf import config_from_hf, model_from_state, ours_from_hf_tensors

    torch.manual_seed(0)
    reference = LlamaForCausalLM(HFLlamaConfig(**SMOLLM2_135M_SHAPE)).eval()
    reference.generation_config.eos_token_id = None  # both produce exactly new_tokens tokens
    reference.generation_config.pad_token_id = 0
    config = config_from_hf(reference.config.to_dict())
    tensors = reference.state_dict()
    ours = model_from_state(config, ours_from_hf_tensors(tensors.__getitem__, config), "SmolLM2-135M shape")
    prompt = torch.randint(0, config.vocab_size, (16,)).tolist()
    results = {"new_tokens": new_tokens, "prompt_tokens": len(prompt), "parameters": ours.num_parameters()}
    for dtype_name in dtype_names:
        reference.to(getattr(torch, dtype_name))
        ours.to(getattr(torch, dtype_name))
        speeds, step_speeds, tokens = time_both_generations(ours, reference, prompt, new_tokens, repeats)
        ratios = [mine / theirs for mine, theirs in zip(speeds["ours"], speeds["transformers"])]
        step_ratios = [mine / theirs for mine, theirs in zip(step_speeds["ours"], step_speeds["transformers"])]
        agree = next((i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["transformers"])) if a != b),
                     len(tokens["ours"]))
        results[dtype_name] = {"ours_tokens_per_s": spread(speeds["ours"]),
                               "transformers_tokens_per_s": spread(speeds["transformers"]),
                               "ratio": spread(ratios), "greedy_tokens_equal_for": agree,
                               "ours_step_tokens_per_s": spread(step_speeds["ours"]),
                               "transformers_step_tokens_per_s": spread(step_speeds["transformers"]),
                               "step_ratio": spread(step_ratios)}
        print_generation_comparison(dtype_name, new_tokens, results[dtype_name])
    return results


def time_both_generations(ours, reference, prompt: list, new_tokens: int, repeats: int) -> tuple[dict, dict, dict]:
    """Tokens/s of whole runs and of single decoding steps (1 / the median time between two new tokens), ours and
    transformers' alternating, so that a busy moment of the machine hits both alike; and the tokens each made."""

    def run_ours(count, stamps):
        return generate(ours, prompt, count, temperature=0.0, on_token=lambda token: stamps.append(time.perf_counter()))

    def run_reference(count, stamps):
        output = reference.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False,
                                    streamer=TimeStamps(stamps))
        return output[0, len(prompt):].tolist()

    run_ours(8, []), run_reference(8, [])  # warm-up: first-call allocations and dispatch caches
    speeds, step_speeds, tokens = {"ours": [], "transformers": []}, {"ours": [], "transformers": []}, {}
    for _ in range(repeats):
        for name, run in (("ours", run_ours), ("transformers", run_reference)):
            stamps = []
            start = time.perf_counter()
            tokens[name] = run(new_tokens, stamps)
            speeds[name].append(len(tokens[name]) / (time.perf_counter() - start))
            steps = sorted(later - earlier for earlier, later in zip(stamps, stamps[1:]))
            step_speeds[name].append(1 / steps[len(steps) // 2])
    return speeds, step_speeds, tokens


def print_generation_comparison(dtype_name: str, new_tokens: int, result: dict) -> None:
    """Two lines: whole runs and single decoding steps, ours against transformers, median (range)."""
    for label, ours_key, theirs_key, ratio_key in (
        (f"{new_tokens} new tokens:", "ours_tokens_per_s", "transformers_tokens_per_s", "ratio"),
        ("per decoding step (median):", "ours_step_tokens_per_s", "transformers_step_tokens_per_s", "step_ratio"),
    ):
        ours, theirs, ratio = result[ours_key], result[theirs_key], result[ratio_key]
        line = (f"{dtype_name if ratio_key == 'ratio' else '':8s} {label} ours {ours['median']:6.1f} tok/s "
                f"({ours['min']:.1f}-{ours['max']:.1f}) | transformers {theirs['median']:6.1f} tok/s "
                f"({theirs['min']:.1f}-{theirs['max']:.1f}) | ratio {ratio['median']:.2f}x "
                f"({ratio['min']:.2f}-{ratio['max']:.2f})")
        if ratio_key == "ratio":
            line += f" | greedy tokens equal for the first {result['greedy_tokens_equal_for']}"
        print(line)


def hf_import_cost(folder: Path, dtype_name: str) -> dict:
    """Seconds and peak memory (above the interpreter with torch imported) of importing a folder (Linux)."""
    # VmHWM: this process's peak resident memory (ru_maxrss would start from the parent's peak, inherited at fork)
    script = (
        "import json, time, torch\n"
        "from llm.hf import load_hf_folder, parameter_bytes\n"
        "def peak(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
        "before = peak()\n"
        "start = time.perf_counter()\n"
        f"model = load_hf_folder({str(folder)!r}, torch.{dtype_name})\n"
        "seconds = time.perf_counter() - start\n"
        "after = peak()\n"
        "print(json.dumps({'seconds': seconds, 'peak_added_bytes': after - before,"
        " 'weight_bytes': parameter_bytes(model)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def hf_import_comparison(folder: Path, repeats: int) -> dict:
    """Write a random folder of the SmolLM2-135M shape (bf16 safetensors, as published) and time importing it."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(HFLlamaConfig(**SMOLLM2_135M_SHAPE)).to(torch.bfloat16).save_pretrained(folder)
    results = {"folder_bytes": sum(path.stat().st_size for path in folder.glob("*.safetensors"))}
    for dtype_name in ("float32", "bfloat16"):
        runs = [hf_import_cost(folder, dtype_name) for _ in range(repeats)]
        results[dtype_name] = {"seconds": spread([run["seconds"] for run in runs]),
                               "peak_added_bytes": spread([run["peak_added_bytes"] for run in runs]),
                               "weight_bytes": runs[0]["weight_bytes"]}
        seconds, peak = results[dtype_name]["seconds"], results[dtype_name]["peak_added_bytes"]
        print(f"import into {dtype_name}: {seconds['median']:.2f} s ({seconds['min']:.2f}-{seconds['max']:.2f}) | "
              f"peak memory +{peak['median'] / 2**20:.0f} MiB for {runs[0]['weight_bytes'] / 2**20:.0f} MiB of weights "
              f"({peak['median'] / runs[0]['weight_bytes']:.2f}x)")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat", action="store_true",
                        help="instead: the chat on SmolLM2-135M-Instruct against transformers, its cache across "
                             "turns, and the server under concurrent streams (llm/chat_bench.py)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--train-steps", type=positive_int, default=5, help="timed optimizer steps per way and round")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds of timing, training and generation alike (ratios: median and range)")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--gen-lengths", type=positive_int_list, default=[128, 512, 1024],
                        help="comma-separated numbers of new tokens (default 128,512,1024)")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 measurements")
    parser.add_argument("--skip-references", action="store_true",
                        help="skip the comparison with llama2.c's and nanoGPT's models (and our hand-written "
                             "attention) at the same shape")
    parser.add_argument("--references-only", action="store_true",
                        help="time only the comparison with llama2.c's and nanoGPT's models (no per-precision "
                             "table of our model, no generation)")
    parser.add_argument("--nanogpt-model", default=None, metavar="PATH",
                        help="your copy of nanoGPT's model.py: its GPT (bias=False, dropout 0) is timed beside the "
                             "rebuild in llm/reference_models.py")
    parser.add_argument("--llama2c-model", default=None, metavar="PATH",
                        help="your copy of llama2.c's model.py: its Transformer is timed beside the rebuild in "
                             "llm/reference_models.py")
    parser.add_argument("--out", default="runs/llm/bench.json", help="where to write the measurements as JSON")
    parser.add_argument("--hf-generation", action="store_true",
                        help="instead: our model against transformers at the SmolLM2-135M shape (random weights): "
                             "greedy tokens/s in fp32 and bf16, and the cost of importing such a folder")
    parser.add_argument("--hf-new-tokens", type=positive_int, default=256, help="--hf-generation: new tokens per run")
    parser.add_argument("--hf-repeats", type=positive_int, default=3, help="--hf-generation: runs per measurement")
    parser.add_argument("--hf-out", default="runs/llm/bench_hf.json", help="--hf-generation: the JSON it writes")
    return parser


def bench_hf_generation(args) -> None:
    """--hf-generation: ours against transformers at the SmolLM2-135M shape, generation and import."""
    results = {"threads": torch.get_num_threads()}
    print(f"SmolLM2-135M shape, random weights, {torch.get_num_threads()} threads")
    results["generation"] = hf_generation_comparison(args.hf_new_tokens, args.hf_repeats,
                                                     ["float32"] + ([] if args.skip_bf16 else ["bfloat16"]))
    results["import"] = hf_import_comparison(Path(args.hf_out).parent / "smollm2-135m-shape", args.hf_repeats)
    Path(args.hf_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.hf_out).write_text(json.dumps(results, indent=1))


def precisions_to_time(device, skip_bf16: bool, results: dict) -> list:
    """fp32, and bf16 where it runs at speed: on a CPU without bf16 units it is a slow emulation, skipped."""
    if skip_bf16:
        return ["float32"]
    choice, reason = choose_dtype(device)
    results["auto_dtype"] = {"choice": choice, "measurement": reason}
    if choice == "bfloat16" or device.type != "cpu":
        return ["float32", "bfloat16"]
    print(f"bf16 skipped: --dtype auto picks {choice} here ({reason})")
    return ["float32"]


def compare_generation(config, device, lengths: list, rounds: int) -> dict:
    """Greedy tokens/s with the KV cache and with recomputation, alternating, for each number of new tokens."""
    torch.manual_seed(0)
    model, results = Llama(config).to(device).eval(), {}
    for new_tokens in lengths:
        cached, recomputed = [], []
        for _ in range(rounds):  # alternate, so that a busy moment of the machine hits both alike
            cached.append(generation_throughput(model, new_tokens, True, device))
            recomputed.append(generation_throughput(model, new_tokens, False, device))
        cached, recomputed = spread(cached), spread(recomputed)
        speedups = spread([with_cache / without for with_cache, without in zip(cached["runs"], recomputed["runs"])])
        cache_bytes = KVCache(config, 1, 16 + new_tokens, "meta").num_bytes()
        results[f"generate_{new_tokens}"] = {"kv_cache_tokens_per_s": cached, "no_cache_tokens_per_s": recomputed,
                                             "speedup": speedups, "kv_cache_bytes": cache_bytes}
        print(f"generate {new_tokens:5d} new tokens: KV cache {cached['median']:7.1f} tok/s | recompute "
              f"{recomputed['median']:7.1f} tok/s | speed-up {speedups['median']:5.1f}x "
              f"[{speedups['min']:.1f}-{speedups['max']:.1f}] | cache {cache_bytes / 2**20:.2f} MiB")
    return results


def import_originals(args) -> dict:
    """--nanogpt-model / --llama2c-model: {"nanoGPT": module or None, "llama2.c": module or None}; a file that is
    missing or cannot be imported ends the bench with one line."""
    if args.skip_references and (args.nanogpt_model or args.llama2c_model):
        sys.exit("error: --nanogpt-model and --llama2c-model are timed in the reference comparison: "
                 "drop --skip-references")
    originals = {}
    for name, flag, path, needed in (("nanoGPT", "--nanogpt-model", args.nanogpt_model, ("GPT", "GPTConfig")),
                                     ("llama2.c", "--llama2c-model", args.llama2c_model, ("Transformer", "ModelArgs"))):
        originals[name] = None
        if not path:
            continue
        if not Path(path).is_file():
            sys.exit(f"error: {flag} {path}: no such file")
        try:
            module = import_model_file(path, f"original_{name.replace('.', '_')}_model")
        except Exception as error:  # noqa: BLE001 - any error of someone else's file: one line, no traceback
            sys.exit(f"error: {flag} {path} cannot be imported ({type(error).__name__}: {error})")
        if not all(hasattr(module, attribute) for attribute in needed):
            sys.exit(f"error: {flag} {path} defines no {' and '.join(needed)}: is it {name}'s model.py?")
        originals[name] = module
    return originals


def main():
    if "--chat" in sys.argv[1:]:  # the chat's own bench, with its own flags (python llm/chat_bench.py --help)
        from llm.chat_bench import main as chat_bench

        return chat_bench([argument for argument in sys.argv[1:] if argument != "--chat"])
    args = build_parser().parse_args()
    if args.hf_generation:
        return bench_hf_generation(args)
    originals = import_originals(args)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    config, train_args = default_config()
    results = {"device": str(device), "threads": torch.get_num_threads(), "config": config.to_dict()}
    flops_per_token = Llama(config).flops_per_token()
    print(f"device {device}, {torch.get_num_threads()} threads; default model, {flops_per_token / 1e6:.1f} MFLOP/token")
    precisions = precisions_to_time(device, args.skip_bf16, results)
    problem = "" if args.skip_compile else compiler_problem(device.type)
    if problem:
        print(f"compiled runs skipped: {problem}")
    results["compile_problem"] = problem
    compile_too = not (args.skip_compile or problem)
    if not args.references_only:
        results["training"] = compare_training(config, train_args, device, args.train_steps, args.rounds, precisions,
                                               compile_too)
        results["train_tokens_per_s_float32"] = results["training"]["ways"]["eager_float32"]["tokens_per_s"]["median"]
    if not args.skip_references:
        ways = [(name, compiled) for compiled in ([False, True] if compile_too else [False]) for name in precisions]
        results["references"] = compare_references(config, train_args, device, args.train_steps, args.rounds, ways,
                                                   originals)
    if not args.references_only:
        results.update(compare_generation(config, device, args.gen_lengths, args.rounds))
    results["peak_memory_mb"] = peak_memory_mb(device)
    print(f"peak memory of this process: {results['peak_memory_mb']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
