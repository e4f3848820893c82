"""Evaluate a model on WikiText-2: loss and perplexity per token, bits per byte, word-level perplexity.

    python llm/eval.py                                     # runs/llm/best.pt on validation and test
    python llm/eval.py --checkpoint runs/llm/best.pt --json
    python llm/eval.py --hf HuggingFaceTB/SmolLM2-135M     # a real Llama on the same WikiText-2 test split
    python llm/eval.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf          # the same, from a llama.cpp GGUF file
    python llm/eval.py --hf PATH --max-tokens 20000        # a quick look: the first 20,000 tokens only

Every token is scored with a sliding window: windows of --context-length tokens that move by --stride tokens, so
every scored token sees at least context - stride tokens of text before it (see --stride for what that costs), and
scored once. A model read with --hf or --gguf is scored in bf16 where a bf16 matmul is clearly faster (--dtype).
Word-level perplexity = exp(total negative log-likelihood of the split / its whitespace-separated words), the
convention of published WikiText-2 results; bits per byte = total NLL / ln 2 / UTF-8 bytes. Both divide the same
total by a tokenizer-independent count, so tokenizers of any size compare fairly. A progress bar (on stderr) shows
the tokens scored, the rate and the time left; --json prints only the JSON line on stdout.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llm.checkpoint import check_tokenizer, load_model
from llm.prepare import PrepareError, encode_text, prepare, read_token_file, saved_hf_source
from llm.runs import RunError, pick_device, positive_int

# --context-length by default: a model's own context, at most this many tokens on each kind of device. Attention
# costs up to 4 * T * d FLOPs per token and layer while the weights' share does not grow with the window T: at 8,192
# positions SmolLM2-135M would spend twice its weights' FLOPs on attention, at 2,048 half of them. A GPU affords more.
LONGEST_DEFAULT_WINDOW = {"cpu": 2048, "mps": 2048, "cuda": 4096}
LEAST_CONTEXT = 512  # by default every scored token sees at least this many tokens before it (or half a window)
POSITIONS_PER_FORWARD = 4096  # fewer windows per forward pass when they would hold more positions than this
LOGITS_CHUNK = 128  # positions whose logits exist at once (V floats each: 25 MB for a 49,152-token vocabulary)
SPLIT_CHOICES = {"valid": ("valid",), "test": ("test",), "both": ("valid", "test")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def half_context_stride(context_length: int) -> int:
    """The sliding-window step of the reported metrics: every scored token sees at least half a context."""
    return context_length // 2


def default_stride(context_length: int) -> int:
    """--stride by default: every scored token sees at least half a window or LEAST_CONTEXT tokens, the fewer.

    Each position of a window costs a forward pass, but only the last `stride` are scored, so a window of T costs
    T / stride forward passes per scored token: 2 at half a window, 4/3 for a window of 2,048 moving by 1,536."""
    return max(half_context_stride(context_length), context_length - LEAST_CONTEXT)


def windows_per_batch(batch_size: int, context_length: int) -> int:
    """At most batch_size windows, fewer where they would hold more than POSITIONS_PER_FORWARD (at least one)."""
    return max(1, min(batch_size, POSITIONS_PER_FORWARD // context_length))


def scoring_windows(count: int, context_length: int, stride: int) -> list[tuple[int, int]]:
    """(first token, first scored target) of each window, so that each of `count` targets is scored exactly once.

    Windows of context_length tokens start every `stride` tokens. The first window scores all its targets; every
    later one only its last `stride`, each of which then sees at least context_length - stride tokens before it. A
    last window, ending at the final token, scores the targets no earlier window reached.
    """
    if count < 1:
        return []
    length = min(context_length, count)
    starts = list(range(0, count - length + 1, stride))
    windows = [(start, 0 if start == 0 else length - stride) for start in starts]
    reached = starts[-1] + length
    if reached < count:
        windows.append((count - length, length - (count - reached)))
    return windows


def final_hidden_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """Llama.forward without its output projection: tokens (B, T) -> the final RMSNorm's output (B, T, d_model).

    Scoring needs the logits only of the positions it scores, and of those only a few at a time."""
    length = tokens.size(1)
    cos, sin = model.rope_cos[:length], model.rope_sin[:length]  # (T, head_dim/2)
    x = model.embedding(tokens)  # (B, T, d_model)
    for layer, block in enumerate(model.blocks):
        x = block(x, cos, sin, None, layer)
    return model.final_norm(x)  # (B, T, d_model)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection of Llama.forward: hidden (..., d_model) -> logits (..., vocab)."""
    if model.output_proj is None:
        return torch.nn.functional.linear(hidden, model.embedding.weight)  # the tied embedding
    return model.output_proj(hidden)


def summed_token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over positions, from their final hidden states (P, d_model) and targets (P,), with
    the logits of LOGITS_CHUNK positions at a time: a whole window's (200 MB at 1,024 positions and a 49,152-token
    vocabulary, and as much again for their log-softmax) would double the memory of a 135M model."""
    total = 0.0
    for start in range(0, targets.size(0), LOGITS_CHUNK):
        logits = output_logits(model, hidden[start : start + LOGITS_CHUNK]).float()  # (chunk, V)
        total += float(torch.nn.functional.cross_entropy(logits, targets[start : start + LOGITS_CHUNK],
                                                         reduction="sum"))
    return total


@torch.no_grad()
def total_negative_log_likelihood(model, tokens: np.ndarray, context_length: int, batch_size: int, device,
                                  stride: int | None = None, progress: tqdm | None = None):
    """Sum of -log p(token | up to context_length previous tokens) over every token after the first, and how many.

    The windows of scoring_windows (default stride: context_length, non-overlapping), batched; the logits of the
    scored positions only. `progress` (a tqdm bar) advances by the targets, and after the first batch an estimate of
    the whole run's time is written above it.
    """
    stride = min(stride or context_length, context_length)
    model.eval()
    windows = scoring_windows(len(tokens) - 1, context_length, stride)
    per_batch = windows_per_batch(batch_size, context_length)
    length = min(context_length, len(tokens) - 1)  # shorter only where the text is
    total, scored, started = 0.0, 0, time.perf_counter()
    for first in range(0, len(windows), per_batch):
        batch = windows[first : first + per_batch]
        rows = [np.asarray(tokens[start : start + length + 1], dtype=np.int64) for start, _ in batch]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, T+1)
        hidden = final_hidden_states(model, block[:, :-1])  # (B, T, d_model)
        before = scored
        for row, (_, first_scored) in enumerate(batch):
            total += summed_token_losses(model, hidden[row, first_scored:], block[row, first_scored + 1 :])
            scored += length - first_scored
        if progress is not None:
            progress.update(scored - before)
            if first == 0 and len(windows) > per_batch:
                print_estimate(time.perf_counter() - started, len(batch), len(windows))
    model.train()
    return total, scored


def print_estimate(seconds: float, windows_done: int, windows: int):
    """One line on stderr: how long the first windows took, and the time left at that rate."""
    left = seconds / windows_done * (windows - windows_done)
    when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    tqdm.write(f"the first {windows_done} of {windows:,} windows took {seconds:.1f} s: about {when} more at this rate",
               file=sys.stderr)


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


def other_model(hf: str | None, gguf: str | None, device, dtype=torch.float32):
    """A Llama someone else trained (--hf folder or hub name, --gguf file) in our model, and its own tokenizer;
    the weights are read straight into `dtype`, one tensor at a time."""
    if gguf:
        from llm.gguf_file import load_gguf

        return load_gguf(gguf, dtype, device)
    from llm.hf import load_hf_model

    return load_hf_model(hf, device, dtype)


def choose_dtype(requested: str, device, checkpoint: bool) -> tuple[torch.dtype, str]:
    """--dtype, and why: auto = float32 for a checkpoint of train.py (its results table was scored so, in a minute or
    two); for --hf and --gguf, bf16 where train.py's --dtype auto takes it (a timed bf16 matmul clearly faster than
    fp32: a GPU, or a CPU with AVX-512 BF16 or AMX), else float32."""
    if requested != "auto":
        return DTYPES[requested], "--dtype"
    if checkpoint:
        return torch.float32, "--dtype auto, a checkpoint of train.py"
    from llm.train import choose_dtype as training_dtype

    name, measurement = training_dtype(device)
    # float16 (a GPU without bf16) risks overflow in the activations of a model trained in bf16: float32 instead
    return (torch.bfloat16 if name == "bfloat16" else torch.float32), f"--dtype auto, {measurement}"


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
             batch_size: int = 16, precision: str | None = None) -> dict:
    """Score every split of `texts` ({split: (tokens, text)}) in sliding windows; the window (and the `precision`,
    a line of why) is printed on stderr."""
    device = torch.device(device)
    shortest = min(len(tokens) - 1 for tokens, _ in texts.values())
    length, reason = choose_context_length(model, device, context_length, shortest)
    stride = stride if stride is not None else default_stride(length)
    if stride > length:
        raise RunError(f"--stride {stride} is longer than the context ({length} tokens)")
    if length > model.rope_cos.size(0):  # checked above to fit the text: only then is a longer table built
        model.set_rope_table(length)
    if precision:
        print(f"weights and computation in {precision}", file=sys.stderr)
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
                        help="how far each window moves; each window scores only its last `stride` tokens, so every "
                             "scored token sees at least context - stride tokens before it, and every position of "
                             "the window costs a forward pass: context / stride passes per scored token. A larger "
                             "stride is faster but gives the first scored tokens of each window less context; the "
                             "context itself = non-overlapping windows, the fastest, but the first tokens of each "
                             f"window are predicted from almost nothing. Default: context - {LEAST_CONTEXT}, or half "
                             f"the context where that is larger (2,048 moving by 1,536: 4/3 passes per token, at "
                             f"least {LEAST_CONTEXT} tokens of context; 128 moving by 64)")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="score only the beginning of each split: its first lines, as many as hold at most "
                             "this many tokens (a quick look; the numbers are not those of the whole split)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help=f"windows per forward pass (fewer where they would hold more than "
                             f"{POSITIONS_PER_FORWARD:,} positions)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="precision of the weights and the computation; auto = float32 for a checkpoint of "
                             "train.py, and for --hf and --gguf bfloat16 where a timed bf16 matmul is clearly faster "
                             "than fp32 (a GPU, a CPU with AVX-512 BF16 or AMX), else float32; the choice is printed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    return parser


def main():
    args = build_parser().parse_args()
    try:
        device, facts = pick_device(args.device), {"max_tokens": args.max_tokens}
        dtype, why = choose_dtype(args.dtype, device, checkpoint=not (args.hf or args.gguf))
        if args.hf or args.gguf:
            model, tokenizer = other_model(args.hf, args.gguf, device, dtype)
            texts = wikitext_texts(tokenizer, SPLIT_CHOICES[args.split or "test"], args.max_tokens)
            name = args.hf or args.gguf
        else:
            model, texts, checkpoint = checkpoint_texts(args.checkpoint, device, SPLIT_CHOICES[args.split or "both"],
                                                        args.max_tokens)
            model, name, facts["step"] = model.to(dtype), args.checkpoint, checkpoint.get("step")
        facts["dtype"] = str(dtype).removeprefix("torch.")
        results = {**evaluate(model, texts, device, name, args.context_length, args.stride, args.batch_size,
                              f"{facts['dtype']} ({why})"), **facts}
    except (ValueError, PrepareError) as error:
        sys.exit(f"error: {error}")
    if args.json:
        print(json.dumps(results))
        return
    step = f" (step {results['step']})" if results.get("step") is not None else ""
    print(f"{results['model']}{step}, {results['dtype']}, windows of {results['context_length']:,} tokens moving by "
          f"{results['stride']:,}")
    for split in ("valid", "test"):
        if split in results:
            metrics = results[split]
            print(f"{split:5s}: loss {metrics['loss']:.4f} nats/token | token perplexity "
                  f"{metrics['token_perplexity']:.1f} | {metrics['bits_per_byte']:.4f} bits/byte | word perplexity "
                  f"{metrics['word_perplexity']:.1f} | {metrics['tokens']:,} tokens, {metrics['words']:,} words, "
                  f"{metrics['bytes_per_token']:.2f} bytes/token")


if __name__ == "__main__":
    main()
