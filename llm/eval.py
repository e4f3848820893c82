"""Evaluate a model on WikiText-2: loss and perplexity per token, bits per byte, word-level perplexity.

    python llm/eval.py                                     # runs/llm/best.pt on validation and test
    python llm/eval.py --checkpoint runs/llm/best.pt --json
    python llm/eval.py --hf HuggingFaceTB/SmolLM2-135M     # a real Llama on the same WikiText-2 test split
    python llm/eval.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf          # the same, from a llama.cpp GGUF file
    python llm/eval.py --hf PATH --max-tokens 20000        # a quick look: the first 20,000 tokens only

Every token is scored with a sliding window: windows of --context-length tokens that move by --stride tokens, so
every scored token sees at least context - stride tokens of text before it. Word-level perplexity = exp(total
negative log-likelihood of the split / its whitespace-separated words), the convention of published WikiText-2
results; bits per byte = total NLL / ln 2 / UTF-8 bytes. Both divide the same total by a tokenizer-independent
count, so tokenizers of any size compare fairly. A progress bar (on stderr) shows the tokens scored, the rate and
the time left; --json prints only the JSON line on stdout.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llm.checkpoint import check_tokenizer, load_model
from llm.prepare import PrepareError, encode_text, prepare, read_token_file, saved_hf_source
from llm.runs import RunError, pick_device, positive_int

# --context-length by default: a model's own context, at most this many tokens on each kind of device. Attention
# costs up to 4 * T * d FLOPs per token and layer while the weights' share does not grow with the window T: at 8,192
# positions SmolLM2-135M would spend twice its weights' FLOPs on attention, at 1,024 a quarter. A GPU affords more.
LONGEST_DEFAULT_WINDOW = {"cpu": 1024, "mps": 2048, "cuda": 4096}
LOGITS_BUDGET_BYTES = 256 * 2**20  # fewer windows per forward pass when their logits would take more than this
SPLIT_CHOICES = {"valid": ("valid",), "test": ("test",), "both": ("valid", "test")}


def half_context_stride(context_length: int) -> int:
    """The sliding-window step of the reported metrics: every scored token sees at least half a context."""
    return context_length // 2


def windows_per_batch(batch_size: int, context_length: int, vocab_size: int) -> int:
    """At most batch_size windows, fewer where their fp32 logits pass the budget (at least one window)."""
    per_window = context_length * vocab_size * 4  # bytes
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // per_window))


@torch.no_grad()
def total_negative_log_likelihood(model, tokens: np.ndarray, context_length: int, batch_size: int, device,
                                  stride: int | None = None, progress: tqdm | None = None):
    """Sum of -log p(token | up to context_length previous tokens) over every token after the first.

    Windows of context_length tokens start every `stride` tokens (default: context_length, non-overlapping).
    The first window scores all its targets; every later one scores only its last `stride` targets, each of
    which then sees at least context_length - stride tokens of context (a sliding window: with non-overlapping
    windows the first targets of every window are predicted from almost nothing). A last window ending at the
    final token scores the targets no earlier window reached. `progress` (a tqdm bar) advances by the targets.
    """
    stride = min(stride or context_length, context_length)
    model.eval()
    count = len(tokens) - 1  # targets: tokens[1:]
    starts = list(range(0, count - context_length + 1, stride))
    batch_size = windows_per_batch(batch_size, context_length, model.config.vocab_size)
    total, scored = 0.0, 0
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        rows = [np.asarray(tokens[s : s + context_length + 1], dtype=np.int64) for s in batch_starts]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, T+1)
        logits, _ = model(block[:, :-1])  # (B, T, V)
        nll = token_losses(logits, block[:, 1:])  # (B, T)
        del logits
        before = scored
        total += float(nll[:, context_length - stride :].sum())
        scored += nll[:, context_length - stride :].numel()
        if batch_starts[0] == 0 and stride < context_length:  # the very first window scores all its targets
            total += float(nll[0, : context_length - stride].sum())
            scored += context_length - stride
        if progress is not None:
            progress.update(scored - before)
    tail = count - scored
    if tail > 0:
        length = min(context_length, count)
        window = torch.from_numpy(np.asarray(tokens[-(length + 1) :], dtype=np.int64)).to(device)[None]  # (1, L+1)
        logits, _ = model(window[:, :-1])  # (1, L, V)
        nll = torch.nn.functional.cross_entropy(logits[0, -tail:].float(), window[0, -tail:], reduction="sum")
        total += float(nll)
        scored += tail
        if progress is not None:
            progress.update(tail)
    model.train()
    return total, scored


def token_losses(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """-log p(target) at each position (B, T) from logits (B, T, V), `chunk` positions at a time: the log-softmax
    of every position at once would take as much memory again as the logits (with a large vocabulary, hundreds of
    MB a window)."""
    return torch.cat([torch.nn.functional.cross_entropy(logits[:, start : start + chunk].float().transpose(1, 2),
                                                        targets[:, start : start + chunk], reduction="none")
                      for start in range(0, targets.size(1), chunk)], dim=1)


def text_metrics(model, tokens, text: str, context_length: int, batch_size: int, device, stride=None,
                 description: str = "scoring") -> dict:
    """Loss per token, perplexity per token, bits per byte and word perplexity of `tokens`, the encoding of `text`
    (which gives the bytes and words the total is divided by)."""
    with tqdm(total=max(0, len(tokens) - 1), desc=description, unit="token", unit_scale=True, file=sys.stderr,
              dynamic_ncols=True) as progress:
        total, count = total_negative_log_likelihood(model, tokens, context_length, batch_size, device, stride,
                                                     progress)
    num_bytes, num_words = len(text.encode("utf-8")), len(text.split())
    loss = total / count
    return {
        "loss": loss, "token_perplexity": math.exp(loss), "tokens": count, "bytes": num_bytes, "words": num_words,
        "bytes_per_token": num_bytes / count, "bits_per_byte": total / math.log(2) / num_bytes,
        "word_perplexity": math.exp(total / num_words),
    }


def split_metrics(model, token_path: Path, text_path: Path, context_length: int, batch_size: int, device,
                  stride: int | None = None, description: str = "scoring") -> dict:
    """text_metrics of one split whose token file and raw text lie on disk (what llm/prepare.py wrote)."""
    tokens = read_token_file(token_path)
    text = Path(text_path).read_text(encoding="utf-8")
    return text_metrics(model, tokens, text, context_length, batch_size, device, stride, description)


def beginning(text: str, encode, max_tokens: int) -> tuple[str, list]:
    """The first lines of `text` whose encoding holds at most max_tokens + 1 tokens (max_tokens targets), and that
    encoding; where even the first line holds more, the longest start of that line that fits."""
    line_ends = [index + 1 for index, character in enumerate(text) if character == "\n"] + [len(text)]
    if len(encode(text[: line_ends[0]])) > max_tokens + 1:
        line_ends = list(range(1, line_ends[0] + 1))  # cut inside the first line, character by character
    low, high = 0, len(line_ends) - 1  # the largest cut that fits: binary search (more text, more tokens)
    while low < high:
        middle = (low + high + 1) // 2
        if len(encode(text[: line_ends[middle]])) <= max_tokens + 1:
            low = middle
        else:
            high = middle - 1
    cut = text[: line_ends[low]]
    return cut, encode(cut)


# ---- what is scored: our checkpoint's splits, or WikiText-2 through another model's tokenizer ----

def checkpoint_texts(checkpoint_path: str, device, splits, max_tokens: int | None):
    """A checkpoint, and for each split its (tokens, text): the token files of its training data (rebuilt if
    missing), or with max_tokens the beginning of the raw text encoded again."""
    model, checkpoint = load_model(checkpoint_path, device)
    train_args = checkpoint.get("args", {})
    prepared = prepare(train_args.get("dataset", "wikitext-2"), checkpoint["config"]["vocab_size"],
                       Path(train_args.get("data_dir", "runs/llm/data")), train_args.get("text_file"),
                       log=lambda *a: None, hf=saved_hf_source(train_args))
    check_tokenizer(checkpoint, prepared.tokenizer_path, checkpoint_path)  # the same ids as in training
    texts = {split: (read_token_file(prepared.token_files[split]),
                     Path(prepared.text_files[split]).read_text(encoding="utf-8")) for split in splits}
    if max_tokens is not None:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(prepared.tokenizer_path))
        texts = {split: first_tokens(text, lambda part: encode_text(processor, part), max_tokens)
                 for split, (_, text) in texts.items()}
    return model, texts, checkpoint


def wikitext_texts(tokenizer, splits, max_tokens: int | None) -> dict:
    """WikiText-2's raw splits, each as (tokens, text), encoded by the model's own tokenizer."""
    from data import DataError, fetch

    try:
        folder = fetch("wikitext-2")
    except DataError as error:
        raise PrepareError(str(error)) from None
    texts = {}
    for split in splits:
        text = (folder / f"{split}.raw").read_text(encoding="utf-8")
        if max_tokens is not None:
            texts[split] = first_tokens(text, tokenizer.encode, max_tokens)
        else:
            texts[split] = (np.asarray(tokenizer.encode(text), dtype=np.int64), text)
    return texts


def other_model(hf: str | None, gguf: str | None, device):
    """A Llama someone else trained (--hf folder or hub name, --gguf file) in our model, and its own tokenizer."""
    if gguf:
        from llm.gguf_file import load_gguf

        return load_gguf(gguf, device=device)
    from llm.hf import load_hf_model

    return load_hf_model(hf, device)


def first_tokens(text: str, encode, max_tokens: int) -> tuple[np.ndarray, str]:
    """(tokens, text) of the beginning of `text` that --max-tokens scores."""
    cut, ids = beginning(text, encode, max_tokens)
    return np.asarray(ids, dtype=np.int64), cut


def choose_context_length(model, device, requested: int | None, shortest_split: int) -> tuple[int, str]:
    """--context-length, else the model's own context up to LONGEST_DEFAULT_WINDOW for this device; and why."""
    trained = model.config.context_length
    if requested is not None:
        length, reason = requested, "--context-length"
    elif trained <= LONGEST_DEFAULT_WINDOW.get(device.type, 1024):
        length, reason = trained, "the model's context"
    else:
        length = LONGEST_DEFAULT_WINDOW.get(device.type, 1024)
        reason = (f"the model's context is {trained:,}; on a {device.type} the default window is at most {length:,}, "
                  "where attention costs a fraction of the weights' work; --context-length chooses another")
    if requested is not None and requested >= shortest_split + 1 and shortest_split > 0:
        raise RunError(f"--context-length {requested} is longer than the text it scores ({shortest_split} tokens)")
    return min(length, max(1, shortest_split)), reason


def evaluate(model, texts: dict, device, name: str, context_length: int | None = None, stride: int | None = None,
             batch_size: int = 16) -> dict:
    """Score every split of `texts` ({split: (tokens, text)}) in sliding windows; the window is printed on stderr."""
    device = torch.device(device)
    shortest = min(len(tokens) - 1 for tokens, _ in texts.values())
    length, reason = choose_context_length(model, device, context_length, shortest)
    stride = stride if stride is not None else half_context_stride(length)
    if stride > length:
        raise RunError(f"--stride {stride} is longer than the context ({length} tokens)")
    if length > model.rope_cos.size(0):  # checked above to fit the text: only then is a longer table built
        model.set_rope_table(length)
    print(f"{name}: {', '.join(texts)}; windows of {length:,} tokens ({reason}) moving by {stride:,}, so every "
          f"scored token sees at least {length - stride:,} before it", file=sys.stderr, flush=True)
    results = {"model": name, "context_length": length, "stride": stride}
    for split, (tokens, text) in texts.items():
        results[split] = text_metrics(model, tokens, text, length, batch_size, device, stride, split)
    return results


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a refused flag value reported in one line ("error: argument --split: invalid choice ...")."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    other = parser.add_mutually_exclusive_group()
    other.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                       help="score a Hugging Face Llama (local folder or hub name) on WikiText-2 instead, "
                            "tokenized by its own tokenizer")
    other.add_argument("--gguf", default=None, metavar="PATH",
                       help="score a Llama GGUF file (llama.cpp's format, weights dequantized) on WikiText-2 instead, "
                            "tokenized by its own tokenizer")
    parser.add_argument("--split", choices=sorted(SPLIT_CHOICES), default=None,
                        help="which split to score: valid, test or both (default: both for a checkpoint, as in "
                             "the results table; test for --hf and --gguf)")
    parser.add_argument("--context-length", type=positive_int, default=None,
                        help="tokens per window (default: the model's own context, at most "
                             + ", ".join(f"{n:,} on {device}" for device, n in LONGEST_DEFAULT_WINDOW.items())
                             + "; the choice is printed)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="how far each window moves: every scored token sees at least context - stride tokens "
                             "before it (default: half the context; the context itself = non-overlapping windows, "
                             "twice as fast, but the first tokens of each window are predicted from little)")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="score only the beginning of each split: its first lines, as many as hold at most "
                             "this many tokens (a quick look; the numbers are not those of the whole split)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="windows per forward pass (fewer where their logits would pass 256 MiB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    return parser


def main():
    args = build_parser().parse_args()
    try:
        device, facts = pick_device(args.device), {"max_tokens": args.max_tokens}
        if args.hf or args.gguf:
            model, tokenizer = other_model(args.hf, args.gguf, device)
            texts = wikitext_texts(tokenizer, SPLIT_CHOICES[args.split or "test"], args.max_tokens)
            name = args.hf or args.gguf
        else:
            model, texts, checkpoint = checkpoint_texts(args.checkpoint, device, SPLIT_CHOICES[args.split or "both"],
                                                        args.max_tokens)
            name, facts["step"] = args.checkpoint, checkpoint.get("step")
        results = {**evaluate(model, texts, device, name, args.context_length, args.stride, args.batch_size), **facts}
    except (ValueError, PrepareError) as error:
        sys.exit(f"error: {error}")
    if args.json:
        print(json.dumps(results))
        return
    step = f" (step {results['step']})" if results.get("step") is not None else ""
    print(f"{results['model']}{step}, windows of {results['context_length']:,} tokens moving by {results['stride']:,}")
    for split in ("valid", "test"):
        if split in results:
            metrics = results[split]
            print(f"{split:5s}: loss {metrics['loss']:.4f} nats/token | token perplexity "
                  f"{metrics['token_perplexity']:.1f} | {metrics['bits_per_byte']:.4f} bits/byte | word perplexity "
                  f"{metrics['word_perplexity']:.1f} | {metrics['tokens']:,} tokens, {metrics['words']:,} words, "
                  f"{metrics['bytes_per_token']:.2f} bytes/token")


if __name__ == "__main__":
    main()
