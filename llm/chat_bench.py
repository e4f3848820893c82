"""How fast the chat runs on SmolLM2-135M-Instruct, side by side in one run so that the ratios are fair.

    python llm/bench.py --chat            # the same as: python llm/chat_bench.py

1. Decoding: our model (as chat.py and serve.py run it, and with its weights left in PyTorch's default layout)
   against transformers' `generate` on the same dequantized weights, same precision, greedy, the same chat prompt,
   in alternating rounds: time to the first token and tokens/s after it, float32 and bfloat16, 1 and 2 threads.
2. The time to the first token of a fifth turn with the KV cache kept across turns, against reading the whole
   conversation again.
3. serve.py (bfloat16) under 1, 4 and 16 concurrent streams: tokens/s of all streams together; its peak memory.
4. llama.cpp on the quantized file itself, where the `llama_cpp` package is installed (optional).
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from llm.bench import TimeStamps
from llm.chat_model import default_model_path, load_chat_model
from llm.conversation import ChatSession, Sampling
from llm.fast_decoding import prepare_for_decoding
from llm.serve import start_server_process

GREEDY = Sampling(temperature=0)
QUESTION = "Write a short story about a lighthouse keeper and a storm."
TURNS = ["What is the capital of France?", "What is it famous for?", "Name three museums there.",
         "Which one is the oldest?", "How do I get there from the airport?"]


def median_and_range(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def transformers_copy(model):
    """transformers' LlamaForCausalLM holding our (dequantized) weights, in the same precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm.hf import hf_config_from_ours, hf_tensors_from_ours

    dtype = model.embedding.weight.dtype
    reference = LlamaForCausalLM(LlamaConfig(**hf_config_from_ours(model.config, None))).eval()
    reference.load_state_dict(hf_tensors_from_ours(model), strict=False)  # lm_head is the tied embedding
    reference.generation_config.eos_token_id = None  # both write exactly the requested number of tokens
    reference.generation_config.pad_token_id = 0
    return reference.to(dtype)


def run_ours(model, tokenizer, new_tokens: int) -> tuple[list, float]:
    """Token arrival times of one chat answer of exactly new_tokens tokens (no stop token), and its start."""
    no_stops = SimpleNamespace(encode=tokenizer.encode, decode=tokenizer.decode, stop_ids=(),
                               apply_chat_template=tokenizer.apply_chat_template)
    session = ChatSession(model, no_stops)
    start, stamps = time.perf_counter(), []
    for _ in session.reply(QUESTION, GREEDY, new_tokens):
        stamps.append(time.perf_counter())
    return stamps[:new_tokens], start  # the decoder's final flush yields once more


def run_transformers(reference, prompt_ids: list[int], new_tokens: int) -> tuple[list, float]:
    stamps = []
    start = time.perf_counter()
    with torch.inference_mode():
        reference.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                           max_new_tokens=new_tokens, do_sample=False, streamer=TimeStamps(stamps))
    return stamps, start


def decode_comparison(dtype_name: str, threads: int, new_tokens: int, rounds: int, path: Path) -> dict:
    """First-token time and decoding tokens/s of three ways, alternating in each round."""
    torch.set_num_threads(threads)
    plain, tokenizer = load_chat_model(gguf=str(path), dtype=getattr(torch, dtype_name))
    reference = transformers_copy(plain)
    fast = copy.deepcopy(plain)
    layouts = prepare_for_decoding(fast)  # what chat.py and serve.py run
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    ways = {"ours": lambda n: run_ours(fast, tokenizer, n),
            "ours_default_layout": lambda n: run_ours(plain, tokenizer, n),
            "transformers": lambda n: run_transformers(reference, prompt_ids, n)}
    for way in ways.values():
        way(4)  # warm-up: first-call allocations and dispatch caches
    first, speed = {name: [] for name in ways}, {name: [] for name in ways}
    for round_number in range(rounds):
        order = list(ways) if round_number % 2 == 0 else list(reversed(ways))
        for name in order:
            stamps, start = ways[name](new_tokens)
            first[name].append(stamps[0] - start)
            speed[name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result = {"dtype": dtype_name, "threads": threads, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
              "layouts": sorted(set(layouts.values())),
              "first_token_s": {name: median_and_range(values) for name, values in first.items()},
              "decode_tokens_per_s": {name: median_and_range(values) for name, values in speed.items()}}
    for name in ("ours", "ours_default_layout"):
        result[f"{name}_vs_transformers"] = median_and_range(
            [mine / theirs for mine, theirs in zip(speed[name], speed["transformers"])])
    report_decoding(result)
    return result


def report_decoding(result: dict):
    speeds, firsts = result["decode_tokens_per_s"], result["first_token_s"]

    def show(name):
        s, f = speeds[name], firsts[name]
        return (f"{name} {s['median']:5.1f} tok/s ({s['min']:.1f}-{s['max']:.1f}), first token "
                f"{f['median'] * 1000:4.0f} ms")

    ratio, plain = result["ours_vs_transformers"], result["ours_default_layout_vs_transformers"]
    print(f"{result['dtype']:8s} {result['threads']} thread(s): {show('ours')} | {show('ours_default_layout')} | "
          f"{show('transformers')} | ours/transformers {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}),"
          f" default layout {plain['median']:.2f}x", flush=True)


def fifth_turn(path: Path, dtype_name: str, threads: int, rounds: int) -> dict:
    """The first-token time of the fifth question: the cache of four turns kept, against all read again."""
    torch.set_num_threads(threads)
    model, tokenizer = load_chat_model(gguf=str(path), dtype=getattr(torch, dtype_name))
    prepare_for_decoding(model)
    session = ChatSession(model, tokenizer)
    for question in TURNS[:4]:
        "".join(session.reply(question, GREEDY, 48))
    turns, cached = list(session.turns), list(session.cached_ids)
    kept, again = [], []
    for _ in range(rounds):
        session.turns, session.cached_ids = list(turns), list(cached)  # the cache's first positions still hold these
        start = time.perf_counter()
        next(iter(session.reply(TURNS[4], GREEDY, 1)))
        kept.append(time.perf_counter() - start)
        fresh = ChatSession(model, tokenizer)
        fresh.turns = list(turns)
        start = time.perf_counter()
        next(iter(fresh.reply(TURNS[4], GREEDY, 1)))
        again.append(time.perf_counter() - start)
    prompt = len(tokenizer.encode(tokenizer.apply_chat_template(turns + [{"role": "user", "content": TURNS[4]}])))
    result = {"dtype": dtype_name, "threads": threads, "conversation_tokens": prompt,
              "cache_kept_s": median_and_range(kept), "read_again_s": median_and_range(again),
              "speedup": median_and_range([slow / quick for quick, slow in zip(kept, again)])}
    print(f"fifth turn ({prompt} tokens of conversation, {dtype_name}, {threads} threads): first token "
          f"{result['cache_kept_s']['median'] * 1000:.0f} ms with the cache kept, "
          f"{result['read_again_s']['median'] * 1000:.0f} ms reading it all again "
          f"({result['speedup']['median']:.1f}x)", flush=True)
    return result


def stream_answer(url: str, topic: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first piece of text) of one streamed chat answer."""
    import httpx

    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return tokens, first


TOPICS = ["the ocean", "volcanoes", "the moon", "honey bees", "the Roman empire", "chess", "rain forests", "jazz",
          "glaciers", "the printing press", "owls", "deserts", "bridges", "comets", "tea", "the violin"]


def server_throughput(path: Path, threads: int, max_tokens: int) -> dict:
    """Tokens/s of 1, 4 and 16 concurrent streams together, and the server's peak memory (Linux)."""
    import urllib.request

    process, url = start_server_process(["--gguf", str(path), "--dtype", "bfloat16"],
                                        {**os.environ, "OMP_NUM_THREADS": str(threads)}, quiet=True)
    results = {"dtype": "bfloat16", "threads": threads, "max_tokens": max_tokens}
    try:
        stream_answer(url, "warm-up", 8)
        for streams in (1, 4, 16):
            start = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                answers = list(pool.map(stream_answer, [url] * streams, TOPICS[:streams], [max_tokens] * streams))
            seconds = time.perf_counter() - start
            tokens = sum(count for count, _ in answers)
            results[f"{streams}_streams"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                             "first_token_s": median_and_range([first for _, first in answers])}
            print(f"serve.py, {streams:2d} concurrent streams: {tokens / seconds:6.1f} tokens/s together "
                  f"({tokens} tokens in {seconds:.1f} s), first token after "
                  f"{results[f'{streams}_streams']['first_token_s']['median']:.2f} s (median)", flush=True)
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        results["batch_sizes"] = health["decode_steps_by_batch_size"]
        status = Path(f"/proc/{process.pid}/status")
        if status.is_file():
            peak = int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024
            results["peak_memory_bytes"] = peak
            print(f"serve.py peak memory (bfloat16 weights, after the 16 streams): {peak / 2**20:.0f} MiB", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return results


def llama_cpp_speed(path: Path, threads: int, new_tokens: int, rounds: int) -> dict | None:
    """llama.cpp's decoding tokens/s on the quantized file, where the llama_cpp package is installed."""
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        print("llama.cpp: the llama_cpp package is not installed; skipped")
        return None
    engine = LlamaCpp(model_path=str(path), n_threads=threads, n_ctx=1024, verbose=False)
    speeds = []
    for _ in range(rounds):
        stamps = []
        for _piece in engine.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=new_tokens,
                                                    temperature=0, stream=True):
            stamps.append(time.perf_counter())
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result = median_and_range(speeds)
    print(f"llama.cpp {threads} thread(s): {result['median']:.1f} tok/s ({result['min']:.1f}-{result['max']:.1f})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="the model file (default: SmolLM2-135M-Instruct, fetched)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens written per decoding run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--server-tokens", type=int, default=64, help="max_tokens of each stream of the server test")
    parser.add_argument("--skip-server", action="store_true", help="skip serve.py's streams and memory")
    parser.add_argument("--out", default="runs/llm/chat_bench.json", help="where to write the measurements as JSON")
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(count) for count in args.threads.split(",")]
        if min(thread_counts) < 1 or args.new_tokens < 2 or args.rounds < 1 or args.server_tokens < 1:
            raise ValueError
    except ValueError:
        sys.exit("error: --threads takes positive integers, --new-tokens >= 2, --rounds and --server-tokens >= 1")
    try:
        path = Path(args.gguf) if args.gguf else default_model_path()
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not path.is_file():
        sys.exit(f"error: {path} does not exist")
    print(f"{path.name}; {os.cpu_count()} CPUs; greedy, {args.new_tokens} new tokens after a chat prompt", flush=True)
    results = {"model": path.name, "cpus": os.cpu_count(), "decoding": [], "fifth_turn": []}
    for dtype_name in ("float32", "bfloat16"):
        for threads in thread_counts:
            results["decoding"].append(decode_comparison(dtype_name, threads, args.new_tokens, args.rounds, path))
    for dtype_name in ("float32", "bfloat16"):
        results["fifth_turn"].append(fifth_turn(path, dtype_name, max(thread_counts), args.rounds))
    results["llama_cpp"] = {threads: llama_cpp_speed(path, threads, args.new_tokens, args.rounds)
                            for threads in thread_counts}
    if not args.skip_server:
        results["server"] = server_throughput(path, max(thread_counts), args.server_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
