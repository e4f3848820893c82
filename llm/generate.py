"""Sample text from a trained checkpoint, token by token, with or without the KV cache.

    python llm/generate.py --prompt "The history of" --num-samples 2 --max-new-tokens 100
    python llm/generate.py --hf HuggingFaceTB/SmolLM2-135M --prompt "The history of"   # a real Llama, in our code
"""

import argparse
import sys
from pathlib import Path

import torch

from llm.chat_template import IncrementalDecoder
from llm.model import KVCache, Llama, LlamaConfig
from llm.prepare import file_sha256
from llm.runs import load_checkpoint, non_negative_float, non_negative_int, positive_float, positive_int, seed_int


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k most likely tokens and the smallest set whose probability reaches top_p; -inf the rest."""
    if top_k and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def print_notice(message: str):
    print(message, file=sys.stderr)


@torch.no_grad()
def generate(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token=None,
    return_logits: bool = False,
    notice=print_notice,
):
    """Extend prompt_ids by max_new_tokens tokens (fewer only when eos_id comes).

    The model places at most `window` positions (its RoPE table: the trained context) and always sees the most
    recent `window` tokens. With the cache: one prefill pass over the prompt, then one position per step; once the
    window is full, each step prefills the latest `window` tokens again (a cache cannot simply slide: every key was
    rotated for the position it had). Without the cache every step recomputes the latest window. A prompt longer
    than the window is cut to its last `window` tokens, and `notice` says so in one line.
    """
    model.eval()
    device = model.embedding.weight.device
    window = model.rope_cos.size(0)
    if len(prompt_ids) > window:
        notice(f"note: the prompt has {len(prompt_ids)} tokens, more than the model's context of {window}; "
               f"it continues from the last {window}")
    tokens = list(prompt_ids)
    cache = None
    if use_cache:  # keys and values are stored in the model's own precision
        cache_length = min(window, len(prompt_ids) + max_new_tokens)
        cache = KVCache(model.config, 1, cache_length, device, model.embedding.weight.dtype)
    generated, step_logits = [], []
    for step in range(max_new_tokens):
        if use_cache and step > 0 and cache.length < window:
            feed = tokens[-1:]  # one new position; the cache holds the rest of the window
        else:
            feed = tokens[-window:]  # no cache, the prefill, or a full window prefilled again
            if use_cache:
                cache.length = 0
        logits, _ = model(torch.tensor([feed], dtype=torch.long, device=device), cache=cache)  # (1, len(feed), V)
        last_logits = logits[:, -1, :].float()  # (1, V)
        if return_logits:
            step_logits.append(last_logits.cpu())
        if temperature == 0:
            next_token = last_logits.argmax(dim=-1, keepdim=True)  # greedy (1, 1)
        else:
            probabilities = filter_logits(last_logits / temperature, top_k, top_p).softmax(dim=-1)
            next_token = torch.multinomial(probabilities.cpu(), 1, generator=generator)  # (1, 1)
        token_id = int(next_token.item())
        generated.append(token_id)
        tokens.append(token_id)
        if on_token is not None:
            on_token(token_id)
        if eos_id is not None and token_id == eos_id:
            break
    if return_logits:
        return generated, torch.cat(step_logits) if step_logits else torch.empty(0)
    return generated


def load_model(checkpoint_path: str, device) -> tuple[Llama, dict]:
    """Load a checkpoint written by llm/train.py; raise ValueError with a readable reason if it is not one."""
    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path, "llm", ("model", "config"))  # on the CPU, tensors only; moved to device below
    try:
        model = Llama(LlamaConfig(**checkpoint["config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path} does not match its config: {str(error).splitlines()[0]}") from None
    return model, checkpoint


def check_tokenizer(checkpoint: dict, tokenizer_path, checkpoint_path) -> None:
    """Refuse, in one line (ValueError), a tokenizer other than the one the checkpoint recorded (by sha256)."""
    recorded = checkpoint.get("tokenizer_sha256")
    if recorded and file_sha256(Path(tokenizer_path)) != recorded:
        raise ValueError(f"the tokenizer {tokenizer_path} is not the one {checkpoint_path} was trained with "
                         f"(its sha256 differs: the text or the vocabulary changed since); refusing to score or "
                         f"generate with ids that mean other pieces")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or mps")
    return device


class StreamPrinter:
    """Print tokens as they arrive, each character once it is whole (IncrementalDecoder, llm/chat_template.py)."""

    def __init__(self, processor, prompt_ids):
        self.decoder = IncrementalDecoder(processor, prompt_ids)

    def __call__(self, token_id: int):
        sys.stdout.write(self.decoder.push(token_id))
        sys.stdout.flush()

    def finish(self):
        sys.stdout.write(self.decoder.flush())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    parser.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                        help="run a Hugging Face Llama checkpoint instead: a local folder or a hub name (owner/model)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: a WikiText-style heading)")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=non_negative_int, default=0,
                        help="sample only among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=positive_float, default=0.95,
                        help="nucleus sampling: smallest set with this mass, in (0, 1]")
    parser.add_argument("--num-samples", type=positive_int, default=1, help="how many continuations to print")
    parser.add_argument("--seed", type=seed_int, default=1337, help="random seed of the sampler")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix each step")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args()
    try:
        if args.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if not 0 < args.top_p <= 1:
            raise ValueError("--top-p must lie in (0, 1]")
        if args.max_new_tokens < 1 or args.num_samples < 1 or args.top_k < 0:
            raise ValueError("--max-new-tokens and --num-samples must be positive, --top-k >= 0")
        if args.prompt_file:
            try:
                prompt = Path(args.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"cannot read prompt file {args.prompt_file}: {error}") from None
        else:
            prompt = args.prompt if args.prompt is not None else " = The history of"
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        device = pick_device(args.device)
        if args.hf:
            from llm.hf import describe, load_hf_model

            model, processor = load_hf_model(args.hf, device)
            print(f"{args.hf}: {describe(model)}", file=sys.stderr)
        else:
            model, checkpoint = load_model(args.checkpoint, device)
            tokenizer_path = checkpoint.get("tokenizer_path", "")
            if not Path(tokenizer_path).is_file():
                raise ValueError(f"the tokenizer {tokenizer_path!r} of this checkpoint is missing; rerun llm/train.py")
            check_tokenizer(checkpoint, tokenizer_path, args.checkpoint)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not args.hf:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    prompt_ids = processor.encode(prompt.rstrip("\n"))
    generator = torch.Generator().manual_seed(args.seed)
    for sample in range(args.num_samples):
        print(f"--- sample {sample + 1} ---", flush=True)
        sys.stdout.write(prompt.rstrip("\n"))
        printer = StreamPrinter(processor, prompt_ids)
        generate(
            model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            use_cache=not args.no_kv_cache, eos_id=processor.eos_id(), generator=generator, on_token=printer,
            notice=print_notice if sample == 0 else (lambda message: None),  # a shortened prompt is said once
        )
        printer.finish()
        print()


if __name__ == "__main__":
    main()
