"""Evaluate a trained character model: test bits per character, and text sampled with a temperature.

    python lstm/eval.py                                   # test bpc of runs/lstm/best.pt
    python lstm/eval.py --json                            # the same as one JSON object
    python lstm/eval.py --sample --prompt "Emma was" --temperature 0.8
"""

import argparse
import json
import math

import torch
from torch.nn import functional as F

from data import DataError
from lstm.model import CharConfig, CharLanguageModel, generate
from lstm.runs import RunError, load_checkpoint, pick_device, positive_float, positive_int, seed_int
from lstm.tasks import load_corpus
from lstm.train import evaluate_bpc, fail


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/lstm/best.pt", help="a language-model checkpoint from train.py")
    parser.add_argument("--split", choices=["test", "validation"], default="test", help="held-out text to score")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with test_bpc) instead of text")
    parser.add_argument("--sample", action="store_true", help="generate text instead of scoring")
    parser.add_argument("--prompt", default="Emma ", help="text the sample continues (every character must be known)")
    parser.add_argument("--temperature", type=positive_float, default=0.8,
                        help="softmax temperature (> 0): <1 safer, >1 wilder")
    parser.add_argument("--length", type=positive_int, default=500, help="characters to generate")
    parser.add_argument("--seed", type=seed_int, default=0, help="sampling seed, in [0, 2**32)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    return parser.parse_args(argv)


def load_language_model(path, device):
    """The model and its vocabulary from a train.py language-model checkpoint."""
    checkpoint = load_checkpoint(path, "lstm", ("model", "config"))
    if "vocabulary" not in checkpoint:
        raise RunError(f"{path} is not a language-model checkpoint (an adding-problem one?)")
    try:
        model = CharLanguageModel(CharConfig(**checkpoint["config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError):
        raise RunError(f"{path} is not a readable lstm checkpoint (its weights do not fit its config)") from None
    model.eval()
    return model, checkpoint


@torch.no_grad()
def loss_by_position(model, ids: torch.Tensor, window: int = 400, stride: int | None = None,
                     batch_size: int = 64) -> torch.Tensor:
    """Bits per character at each position of windows read from a zero state: how far back the model reaches.

    Windows of `window` characters start every `stride` characters (overlapping when stride < window, which
    averages each position over more text); each is read on its own, from h = c = 0, so position t has exactly
    t characters of context. Where the curve stops falling, more history stops helping.
    """
    stride = stride or window
    if len(ids) <= window:
        raise ValueError(f"the text ({len(ids):,} characters) is not longer than one window of {window:,}")
    starts = torch.arange(0, len(ids) - window, stride)  # (N,)
    offsets = torch.arange(window)  # (W,)
    inputs = ids[starts[:, None] + offsets]  # (N, W)
    targets = ids[starts[:, None] + offsets + 1]  # (N, W)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(window, dtype=torch.float64)
    for first in range(0, len(starts), batch_size):
        logits, _ = model(inputs[first : first + batch_size].to(device))  # (b, W, V)
        batch_targets = targets[first : first + batch_size].to(device)  # (b, W)
        nats = F.cross_entropy(logits.transpose(1, 2), batch_targets, reduction="none")  # (b, W)
        total += nats.sum(0).double().cpu()
    model.train(was_training)
    return (total / len(starts) / math.log(2)).float()  # (W,)


def main(argv=None):
    """Score or sample, turning user mistakes into one line on stderr."""
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, checkpoint = load_language_model(args.checkpoint, device)
        corpus = load_corpus(checkpoint["books"])
        if corpus.vocabulary != checkpoint["vocabulary"]:
            raise RunError("the books on disk do not give the vocabulary the checkpoint was trained with")
        result = {"checkpoint": args.checkpoint, "step": checkpoint["step"], "cell": model.config.cell,
                  "impl": model.config.impl}
        if args.sample:
            if not args.prompt:
                raise RunError("--prompt is empty: give at least one character to start from")
            prompt_ids = corpus.encode(args.prompt)
            generator = torch.Generator().manual_seed(args.seed)
            pieces = []
            if not args.json:
                print(args.prompt, end="", flush=True)
            for token in generate(model, prompt_ids, args.length, args.temperature, generator):
                character = corpus.vocabulary[token]
                pieces.append(character)
                if not args.json:
                    print(character, end="", flush=True)  # streamed: each character as soon as it is sampled
            if not args.json:
                print()
            result["sample"] = args.prompt + "".join(pieces)
        if args.json or not args.sample:
            text = corpus.test if args.split == "test" else corpus.validation
            bpc = evaluate_bpc(model, torch.tensor(corpus.encode(text)))
            result[f"{args.split}_bpc"] = bpc
            if args.json:
                print(json.dumps(result))
            else:
                print(f"{args.split} bpc {bpc:.4f} ({len(text):,} characters, {model.config.cell} "
                      f"{model.config.impl}, step {checkpoint['step']})")
    except (RunError, DataError, FileNotFoundError, ValueError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
