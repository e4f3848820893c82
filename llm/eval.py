"""Evaluate a checkpoint: loss and perplexity per token, bits per byte, word-level perplexity.

    python llm/eval.py --checkpoint runs/llm/best.pt
    python llm/eval.py --checkpoint runs/llm/best.pt --json
    python llm/eval.py --hf HuggingFaceTB/SmolLM2-135M     # a real Llama on the same WikiText-2 test split

Every token is scored with a sliding window (by default each window moves half the context, so every scored
token sees at least half a context of text before it). Word-level perplexity = exp(total negative log-likelihood
of the test split / its whitespace-separated words), the convention of published WikiText-2 results; bits per
byte = total NLL / ln 2 / UTF-8 bytes. Both divide the same total by a tokenizer-independent count, so
tokenizers of any size compare fairly.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from llm.checkpoint import check_tokenizer, load_model
from llm.prepare import PrepareError, prepare, read_token_file, saved_hf_source
from llm.runs import pick_device

HF_DEFAULT_CONTEXT = 1024  # --hf: windows of the model's context, at most this many tokens (CPU time grows with it)


def half_context_stride(context_length: int) -> int:
    """The sliding-window step of the reported metrics: every scored token sees at least half a context."""
    return context_length // 2


@torch.no_grad()
def total_negative_log_likelihood(model, tokens: np.ndarray, context_length: int, batch_size: int, device,
                                  stride: int | None = None):
    """Sum of -log p(token | up to context_length previous tokens) over every token after the first.

    Windows of context_length tokens start every `stride` tokens (default: context_length, non-overlapping).
    The first window scores all its targets; every later one scores only its last `stride` targets, each of
    which then sees at least context_length - stride tokens of context (a sliding window: with non-overlapping
    windows the first targets of every window are predicted from almost nothing). A last window ending at the
    final token scores the targets no earlier window reached.
    """
    stride = min(stride or context_length, context_length)
    model.eval()
    count = len(tokens) - 1  # targets: tokens[1:]
    starts = list(range(0, count - context_length + 1, stride))
    total, scored = 0.0, 0
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        rows = [np.asarray(tokens[s : s + context_length + 1], dtype=np.int64) for s in batch_starts]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, T+1)
        logits, _ = model(block[:, :-1])  # (B, T, V)
        targets = block[:, 1:]  # (B, T)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
        total += float(nll[:, context_length - stride :].sum())
        scored += nll[:, context_length - stride :].numel()
        if batch_starts[0] == 0 and stride < context_length:  # the very first window scores all its targets
            total += float(nll[0, : context_length - stride].sum())
            scored += context_length - stride
    tail = count - scored
    if tail > 0:
        length = min(context_length, count)
        window = torch.from_numpy(np.asarray(tokens[-(length + 1) :], dtype=np.int64)).to(device)[None]  # (1, L+1)
        logits, _ = model(window[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits[0, -tail:].float(), window[0, -tail:], reduction="sum")
        total += float(nll)
        scored += tail
    model.train()
    return total, scored


def split_metrics(model, token_path: Path, text_path: Path, context_length: int, batch_size: int, device,
                  stride: int | None = None) -> dict:
    """Loss per token, perplexity per token, bits per byte and word perplexity of one split."""
    tokens = read_token_file(token_path)
    text = Path(text_path).read_text(encoding="utf-8")
    return text_metrics(model, tokens, text, context_length, batch_size, device, stride)


def text_metrics(model, tokens, text: str, context_length: int, batch_size: int, device, stride=None) -> dict:
    """split_metrics for tokens already in memory: `text` gives the bytes and words the totals are divided by."""
    total, count = total_negative_log_likelihood(model, tokens, context_length, batch_size, device, stride)
    num_bytes, num_words = len(text.encode("utf-8")), len(text.split())
    loss = total / count
    return {
        "loss": loss, "token_perplexity": math.exp(loss), "tokens": count, "bytes": num_bytes, "words": num_words,
        "bytes_per_token": num_bytes / count, "bits_per_byte": total / math.log(2) / num_bytes,
        "word_perplexity": math.exp(total / num_words),
    }


def evaluate_checkpoint(checkpoint_path: str, device, context_length=None, batch_size=16, splits=("valid", "test"),
                        stride=None):
    """Load a checkpoint, find (or rebuild) its token files, and measure each split."""
    model, checkpoint = load_model(checkpoint_path, device)
    train_args = checkpoint.get("args", {})
    prepared = prepare(train_args.get("dataset", "wikitext-2"), checkpoint["config"]["vocab_size"],
                       Path(train_args.get("data_dir", "runs/llm/data")), train_args.get("text_file"),
                       log=lambda *a: None, hf=saved_hf_source(train_args))
    check_tokenizer(checkpoint, prepared.tokenizer_path, checkpoint_path)  # the same ids as in training
    length = context_length or model.config.context_length
    shortest = min(len(read_token_file(prepared.token_files[split])) for split in splits)
    if context_length and context_length >= shortest:  # checked before a position table of that length is built
        raise ValueError(f"--context-length {context_length} is longer than the split it scores ({shortest} tokens)")
    if stride is not None and stride > length:
        raise ValueError(f"--stride {stride} is longer than the context ({length} tokens)")
    if length > model.rope_cos.size(0):
        model.set_rope_table(length)
    stride = stride if stride is not None else half_context_stride(length)
    results = {}
    for split in splits:
        results[split] = split_metrics(model, prepared.token_files[split], prepared.text_files[split], length,
                                       batch_size, device, stride)
    return results, checkpoint


def evaluate_hf(name_or_path: str, device, context_length=None, batch_size=16, splits=("test",), stride=None):
    """A Hugging Face Llama (folder or hub name) on WikiText-2, tokenized by its own tokenizer, scored as ours."""
    from data import DataError, fetch
    from llm.hf import load_hf_model

    model, tokenizer = load_hf_model(name_or_path, device)
    try:
        folder = fetch("wikitext-2")
    except DataError as error:
        raise PrepareError(str(error)) from None
    length = context_length or min(model.config.context_length, HF_DEFAULT_CONTEXT)
    if length > model.rope_cos.size(0):
        model.set_rope_table(length)
    stride = stride if stride is not None else half_context_stride(length)
    results = {}
    for split in splits:
        text = (folder / f"{split}.raw").read_text(encoding="utf-8")
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
        results[split] = text_metrics(model, tokens, text, length, batch_size, device, stride)
        results[split]["context_length"] = length
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    parser.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                        help="score a Hugging Face Llama (local folder or hub name) on WikiText-2 test instead, "
                             f"with windows of its context up to {HF_DEFAULT_CONTEXT} tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--context-length", type=int, default=None, help="evaluation window (default: training's)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding-window step: each scored token sees at least context - stride tokens of context "
                             "(default: half the context; the context length itself = non-overlapping windows)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = parser.parse_args()
    try:
        if args.batch_size < 1 or any(value is not None and value < 1 for value in (args.context_length, args.stride)):
            raise ValueError("--batch-size, --context-length and --stride must be positive")
        if args.hf:
            results = evaluate_hf(args.hf, pick_device(args.device), args.context_length, args.batch_size,
                                  stride=args.stride)
        else:
            results, checkpoint = evaluate_checkpoint(args.checkpoint, pick_device(args.device), args.context_length,
                                                      args.batch_size, stride=args.stride)
    except (ValueError, PrepareError) as error:
        sys.exit(f"error: {error}")
    if args.hf:
        test = results["test"]
        if args.json:
            print(json.dumps({"model": args.hf, "test_loss": test["loss"], "bits_per_byte": test["bits_per_byte"],
                              "word_perplexity": test["word_perplexity"], "token_perplexity": test["token_perplexity"],
                              "bytes_per_token": test["bytes_per_token"], "tokens": test["tokens"],
                              "context_length": test["context_length"]}))
            return
        print(f"{args.hf} (windows of {test['context_length']} tokens)")
    elif args.json:
        print(json.dumps(checkpoint_summary(results, checkpoint)))
        return
    else:
        print(f"checkpoint {args.checkpoint} (step {checkpoint.get('step')})")
    for name, metrics in results.items():
        print(f"{name:5s}: loss {metrics['loss']:.4f} nats/token | token perplexity {metrics['token_perplexity']:.1f} "
              f"| {metrics['bits_per_byte']:.4f} bits/byte | word perplexity {metrics['word_perplexity']:.1f} "
              f"| {metrics['tokens']:,} tokens, {metrics['words']:,} words, "
              f"{metrics['bytes_per_token']:.2f} bytes/token")


def checkpoint_summary(results: dict, checkpoint: dict) -> dict:
    """The --json line of a checkpoint: validation and test metrics."""
    valid, test = results["valid"], results["test"]
    return {
        "val_loss": valid["loss"], "test_loss": test["loss"], "val_bits_per_byte": valid["bits_per_byte"],
        "bits_per_byte": test["bits_per_byte"], "word_perplexity": test["word_perplexity"],
        "val_word_perplexity": valid["word_perplexity"], "token_perplexity": test["token_perplexity"],
        "bytes_per_token": test["bytes_per_token"], "step": checkpoint.get("step"),
    }


if __name__ == "__main__":
    main()
