"""LoRA against full fine-tuning of SmolLM2-135M on this machine: training tokens per second and peak memory.

    python llm/finetune_bench.py                       # every way, 6 timed steps each, batch 8 x 64 tokens
    python llm/finetune_bench.py --ways lora-bf16,full-fp32 --steps 10

Each way runs in a process of its own (so its peak resident memory is its own): load the model, one untimed
step, then --steps timed optimizer steps (forward, backward, AdamW) on random tokens whose last half are answer
tokens, as in llm/sft.py. Reported: the median tokens/s with its range, and the process's peak resident memory.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from llm.runs import positive_int

WAYS = {
    "lora-bf16": "LoRA rank 8, base in bf16 (the default of llm/sft.py)",
    "lora-fp32": "LoRA rank 8, base in float32",
    "full-bf16": "full fine-tuning, float32 weights, bf16 autocast",
    "full-fp32": "full fine-tuning, float32",
}


def measure(way: str, steps: int, batch: int, length: int) -> dict:
    """Time `steps` optimizer steps of one way in this process."""
    from llm.chat_model import load_chat_model
    from llm.lora import add_lora
    from llm.sft import AnswerLoss

    torch.manual_seed(0)
    model, _ = load_chat_model(dtype=torch.bfloat16 if way == "lora-bf16" else torch.float32)
    model.train()
    if way.startswith("lora"):
        add_lora(model, rank=8, alpha=16)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss_module = AnswerLoss(model)
    inputs = torch.randint(0, model.config.vocab_size, (batch, length))  # (B, T)
    targets = torch.randint(0, model.config.vocab_size, (batch, length))
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length // 2 :] = True
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=way == "full-bf16")
    seconds = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with autocast:
            loss = loss_module(inputs, targets, mask) / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state: not timed
            seconds.append(time.perf_counter() - started)
    rates = [batch * length / s for s in seconds]
    return {"way": way, "tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in trainable), "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    parser.add_argument("--steps", type=positive_int, default=6, help="timed optimizer steps per way")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--length", type=positive_int, default=64, help="tokens per sequence")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one way, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch_size, args.length)))
        return
    ways = [way.strip() for way in args.ways.split(",") if way.strip()]
    unknown = [way for way in ways if way not in WAYS]
    if unknown or not ways:
        sys.exit(f"error: --ways takes a comma list of {', '.join(WAYS)}, not {args.ways!r}")
    print(f"| way | trainable parameters | tokens/s (median, range of {args.steps} steps) | peak memory |")
    print("|---|---|---|---|")
    for way in ways:
        result = subprocess.run([sys.executable, __file__, "--one", way, "--steps", str(args.steps), "--batch-size",
                                 str(args.batch_size), "--length", str(args.length)], capture_output=True, text=True,
                                env=os.environ)
        if result.returncode != 0:
            sys.exit(f"error: {way} failed: {result.stderr.strip().splitlines()[-1] if result.stderr else '?'}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {WAYS[way]} | {row['trainable']:,} | {row['tokens_per_s']:.0f} ({row['min']:.0f}-{row['max']:.0f})"
              f" | {row['peak_rss_mb']:,.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
