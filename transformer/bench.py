"""Side-by-side timings: training throughput, KV-cached vs recomputed greedy decoding, beam search, attention kernels.

    python transformer/bench.py                       # uses runs/transformer/best.pt if it exists for beam search
    python transformer/bench.py --threads 1 --device cpu
"""

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from data import DataError
from transformer.decoding import beam_search, greedy_decode
from transformer.model import Transformer, TransformerConfig, scaled_dot_product_attention
from transformer.prepare import BOS_ID, EOS_ID
from transformer.runs import RunError, int_in_range, pick_device, positive_int
from transformer.train import load_run_checkpoint, model_from_checkpoint


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator to finish its queued work (its calls return before the work is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(functions: dict, repeats: int, device: torch.device) -> dict:
    """The median seconds of one call of each function, after one warm-up call of each.

    The calls take turns (a, b, a, b, ...), so that a burst of other work on the machine slows every contender
    alike, and the median ignores the odd call that such a burst hit hardest.
    """
    seconds = {name: [] for name in functions}
    for repeat in range(repeats + 1):
        for name, function in functions.items():
            synchronize(device)
            started = time.perf_counter()
            function()
            synchronize(device)
            if repeat > 0:  # the first round is the warm-up
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}


def training_step(model, optimizer, source, target):
    """One Adam step on label-smoothed cross-entropy, as in train.py."""
    logits = model(source, target[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten(), label_smoothing=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def bench_training(config: TransformerConfig, batch: int, length: int, repeats: int, device: torch.device):
    """Target tokens per second of full training steps, with the hand-written and the fused attention."""
    source = torch.randint(4, config.vocab_size, (batch, length), device=device)  # (B, Ts)
    target = torch.randint(4, config.vocab_size, (batch, length + 1), device=device)  # (B, 1 + Tt)
    steps = {}
    for attention in ["handwritten", "fused"]:
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(**{**config.to_dict(), "attention": attention})).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        steps[attention] = partial(training_step, model, optimizer, source, target)
    rates = {name: batch * length / seconds for name, seconds in timed(steps, repeats, device).items()}
    for attention, rate in rates.items():
        print(f"train step, {attention:11s} attention: {rate:8.0f} target tokens/s")
    print(f"  fused / handwritten: {rates['fused'] / rates['handwritten']:.2f}x")


def bench_attention_kernel(repeats: int, device: torch.device):
    """The attention of eq. 1 alone, forward and backward, at a typical batch: hand-written vs fused."""
    query, key, value = (torch.randn(64, 4, 24, 64, device=device, requires_grad=True) for _ in range(3))
    allowed = torch.ones(24, 24, dtype=torch.bool, device=device).tril()  # (Tq, Tk) causal

    def handwritten():
        scaled_dot_product_attention(query, key, value, allowed)[0].sum().backward()

    def fused():
        F.scaled_dot_product_attention(query, key, value, attn_mask=allowed).sum().backward()

    times = timed({"handwritten": handwritten, "fused": fused}, repeats, device)
    for name, seconds in times.items():
        print(f"attention kernel (64x4 heads x 24x24, fwd+bwd), {name:11s}: {seconds * 1e3:7.2f} ms")
    print(f"  fused speed-up: {times['handwritten'] / times['fused']:.2f}x")


def bench_greedy(model: Transformer, batch: int, source_length: int, repeats: int, device: torch.device):
    """Greedy decoding tokens/s with the KV cache and with the prefix recomputed, at 32 and 128 new tokens.

    Decoding never stops at EOS here, so every run writes exactly new_tokens tokens whatever the weights are.
    """
    source = torch.randint(4, model.config.vocab_size, (batch, source_length), device=device)  # (B, Ts)
    for new_tokens in [32, 128]:
        decoders = {use_cache: partial(greedy_decode, model, source, BOS_ID, EOS_ID, new_tokens, use_cache,
                                       stop_at_eos=False) for use_cache in [True, False]}
        seconds = timed(decoders, repeats, device)
        cached, recomputed = batch * new_tokens / seconds[True], batch * new_tokens / seconds[False]
        print(f"greedy, batch {batch}, {new_tokens:3d} tokens: cached {cached:7.0f} tokens/s, "
              f"recomputed {recomputed:7.0f} tokens/s, speed-up {cached / recomputed:.2f}x")


def bench_beam(model: Transformer, processor, sentences: list[str], beam_sizes, device: torch.device):
    """Beam search seconds per sentence (sentences decoded one at a time, as in interactive use)."""
    encoded = [torch.tensor([processor.encode(s) + [EOS_ID]], device=device) for s in sentences]  # (1, Ts) each
    for beam_size in beam_sizes:
        started = time.perf_counter()
        for source in encoded:
            if beam_size == 1:
                greedy_decode(model, source, BOS_ID, EOS_ID, source.size(1) * 2 + 10)
            else:
                beam_search(model, source, BOS_ID, EOS_ID, source.size(1) * 2 + 10, beam_size)
        synchronize(device)
        per_sentence = (time.perf_counter() - started) / len(encoded)
        print(f"beam {beam_size}: {per_sentence * 1e3:7.1f} ms per sentence ({len(encoded)} sentences, batch 1)")


def parse_args(argv=None):
    """Every flag of the benchmark, with the range each one accepts."""
    parser = argparse.ArgumentParser(description="Benchmark the Transformer chapter on this machine: training steps "
                                                 "with both attention kernels, KV-cached vs recomputed greedy "
                                                 "decoding, beam search.")
    parser.add_argument("--checkpoint", default="runs/transformer/best.pt",
                        help="trained model whose shape the training and decoding timings use, and which beam search "
                             "decodes with (if the file does not exist: random weights of the default shape, and no "
                             "beam-search timing)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed calls of each contender, after one warm-up; the median is reported (>= 1)")
    parser.add_argument("--beam-sentences", type=positive_int, default=40,
                        help="test sentences decoded one at a time for the beam-search timing (>= 1)")
    parser.add_argument("--threads", type=int_in_range(0, 1024), default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    return parser.parse_args(argv)


def benchmark(args):
    """Run every comparison and print the ratios."""
    device = pick_device(args.device)
    checkpoint = load_run_checkpoint(args.checkpoint) if Path(args.checkpoint).exists() else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU thread(s)")
    torch.manual_seed(0)
    processor = None
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint, device).eval()
        from transformer.prepare import load_tokenizer

        processor = load_tokenizer(bytes(checkpoint["tokenizer"].tolist()))
        print(f"decoding with {args.checkpoint}")
    else:
        print(f"({args.checkpoint} does not exist; decoding timings use random weights, beam search is skipped)")
        model = Transformer(TransformerConfig()).to(device).eval()
    bench_training(model.config, batch=125, length=12, repeats=args.repeats, device=device)
    bench_attention_kernel(repeats=10 * args.repeats, device=device)
    bench_greedy(model, batch=1, source_length=16, repeats=args.repeats, device=device)
    bench_greedy(model, batch=32, source_length=16, repeats=args.repeats, device=device)
    if processor is not None:
        from transformer.prepare import load_pairs, split_pairs

        split = checkpoint["split"]
        test = split_pairs(load_pairs(), split["seed"], split["valid_fraction"], split["test_fraction"])["test"]
        every = max(len(test) // args.beam_sentences, 1)
        sentences = [source for source, _ in test[::every][: args.beam_sentences]]
        bench_beam(model, processor, sentences, [1, 2, 4, 8], device)


def main(argv=None):
    """Run, turning errors a user can cause (an unreadable checkpoint, missing data) into one line on stderr."""
    try:
        benchmark(parse_args(argv))
    except (RunError, DataError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
