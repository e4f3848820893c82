"""Score a trained translator on the held-out test split, show examples and attention, or translate one sentence.

    python transformer/eval.py                                   # greedy and beam 4: BLEU, chrF, examples, heat-map
    python transformer/eval.py --translate "Where is the station?"
    python transformer/eval.py --beam-size 8 --no-greedy --json  # one JSON object: bleu, chrf, beam_size, ...
"""

import argparse
import json
import re
import sys
import textwrap
import time
from pathlib import Path

import matplotlib
import torch

from data import DataError
from transformer.decoding import translate
from transformer.prepare import EOS_ID, load_pairs, load_tokenizer, split_pairs
from transformer.runs import RunError, int_in_range, non_negative_float, non_negative_int, pick_device
from transformer.train import load_run_checkpoint, model_from_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_args(argv=None):
    """Every flag of the evaluation, with the range each one accepts."""
    parser = argparse.ArgumentParser(description="Evaluate the English->Spanish Transformer.")
    parser.add_argument("--checkpoint", default="runs/transformer/best.pt", help="checkpoint written by train.py")
    parser.add_argument("--split", choices=["test", "valid"], default="test", help="which held-out split to score")
    parser.add_argument("--beam-size", type=int_in_range(1, 100), default=4,
                        help="beams of beam search (1: greedy only)")
    parser.add_argument("--length-penalty", type=non_negative_float, default=0.6,
                        help="alpha of ((5 + length) / 6) ** alpha (>= 0)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy decode (beam search only)")
    parser.add_argument("--limit", type=non_negative_int, default=0, help="score only the first N pairs (0: all)")
    parser.add_argument("--batch-size", type=int_in_range(1, 4096), default=64, help="sentences decoded together")
    parser.add_argument("--examples", type=non_negative_int, default=8, help="rows of the example table")
    parser.add_argument("--heatmap-sentence", default="I don't know what you want me to do.",
                        help="English sentence whose attention is drawn into attention.png")
    parser.add_argument("--out-dir", default=None, help="where attention.png goes (default: the checkpoint's folder)")
    parser.add_argument("--translate", default=None,
                        help="translate this English text (sentence by sentence) and exit")
    parser.add_argument("--attention", choices=["handwritten", "fused"], default=None,
                        help="attention kernel for decoding (default: the one trained with)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object, nothing else")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    args = parser.parse_args(argv)
    for name in ("translate", "heatmap_sentence"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RunError(f"--{name.replace('_', '-')} needs UTF-8 text") from None
        if not text.strip():
            raise RunError(f"--{name.replace('_', '-')} needs some English text")
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise RunError(f"--out-dir {args.out_dir} is a file, not a folder")
    return args


def split_sentences(text: str) -> list[str]:
    """A text -> its sentences (ended by . ! ? or a line break): the model was trained on single sentences."""
    sentences = re.findall(r"[^.!?\n]+[.!?]*[\"'»”)\]]*", text)
    return [sentence.strip() for sentence in sentences if sentence.strip(" \t.!?\"'»”)]")]


def translate_text(model, processor, text: str, beam_size: int, length_penalty: float, device) -> str:
    """Translate every sentence of `text` (a longer text would otherwise end at the first sentence's EOS)."""
    sentences = split_sentences(text) or [text.strip()]
    limit = model.config.max_len - 1  # positions left after EOS
    for sentence in sentences:
        length = len(processor.encode(sentence))
        if length > limit:
            raise RunError(f"a sentence of --translate is {length} tokens long; the model reads at most {limit} "
                            f"(\"{sentence[:40]}...\")")
    return " ".join(translate(model, processor, sentences, beam_size, length_penalty, device=device))


@torch.no_grad()
def plot_attention(model, processor, sentence: str, path: Path, device):
    """Heat-maps per head: the last encoder layer's self-attention and the last decoder layer's cross-attention."""
    translation = translate(model, processor, [sentence], beam_size=1, device=device)[0]
    source = torch.tensor([processor.encode(sentence) + [EOS_ID]], device=device)  # (1, Ts)
    target = torch.tensor([[processor.bos_id()] + processor.encode(translation)], device=device)  # (1, Tt)
    encoder_attention = model.encoder_layers[-1].self_attention
    cross_attention = model.decoder_layers[-1].cross_attention
    encoder_attention.keep_weights = cross_attention.keep_weights = True
    model(source, target)
    encoder_attention.keep_weights = cross_attention.keep_weights = False
    source_pieces = processor.id_to_piece(source[0].tolist())
    target_pieces = processor.id_to_piece(target[0].tolist())
    heads = model.config.num_heads
    figure, axes = plt.subplots(2, heads, figsize=(3.2 * heads, 6.4), squeeze=False)
    for head in range(heads):
        for row, (module, rows, title) in enumerate([
            (encoder_attention, source_pieces, "encoder self-attention"),
            (cross_attention, target_pieces, "decoder cross-attention"),
        ]):
            axis = axes[row][head]
            axis.imshow(module.last_weights[0, head].cpu(), cmap="viridis", vmin=0.0, vmax=1.0)
            axis.set_xticks(range(len(source_pieces)), source_pieces, rotation=90, fontsize=7)
            axis.set_yticks(range(len(rows)), rows, fontsize=7)
            axis.set_title(f"{title}, head {head + 1}", fontsize=8)
    # about 14 characters of a 9-point title fit in an inch: wrap it so that it never runs off the image
    title = textwrap.fill(f"{sentence}  ->  {translation}", width=int(figure.get_figwidth() * 14))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return translation


def score(hypotheses, references) -> dict:
    """Corpus BLEU and chrF with sacrebleu (one reference per pair)."""
    import sacrebleu

    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
    }


def evaluate(args):
    """Decode the split greedily and with beam search, score, and draw the attention of one sentence."""
    device = pick_device(args.device)
    checkpoint = load_run_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, device, args.attention).eval()
    processor = load_tokenizer(bytes(checkpoint["tokenizer"].tolist()))
    if args.translate is not None:
        print(translate_text(model, processor, args.translate, args.beam_size, args.length_penalty, device))
        return
    split = checkpoint["split"]
    pairs = split_pairs(load_pairs(), split["seed"], split["valid_fraction"], split["test_fraction"])[args.split]
    if args.limit:
        pairs = pairs[: args.limit]
    # several pairs can share one English sentence (it has several translations): decode each sentence once
    sources = sorted({source for source, _ in pairs})
    references = [target for _, target in pairs]
    results, outputs = {}, {}
    decoders = ([] if args.no_greedy or args.beam_size == 1 else [1]) + [args.beam_size]
    for beam_size in decoders:
        started = time.time()
        translated = translate(model, processor, sources, beam_size, args.length_penalty, args.batch_size, device)
        lookup = dict(zip(sources, translated))
        outputs[beam_size] = [lookup[source] for source, _ in pairs]
        results[beam_size] = score(outputs[beam_size], references)
        results[beam_size]["seconds"] = round(time.time() - started, 1)
    best = results[args.beam_size]
    report = {
        "bleu": best["bleu"], "chrf": best["chrf"], "beam_size": args.beam_size,
        "length_penalty": args.length_penalty, "split": args.split, "pairs": len(pairs),
        "distinct_sources": len(sources), "decode_seconds": best["seconds"], "checkpoint": str(args.checkpoint),
        "trained_steps": checkpoint["step"],
    }
    if 1 in results and args.beam_size != 1:
        report.update({"greedy_bleu": results[1]["bleu"], "greedy_chrf": results[1]["chrf"]})
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.split}: {len(pairs)} pairs, {len(sources)} distinct English sentences, one reference per pair")
    for beam_size, result in results.items():
        name = "greedy" if beam_size == 1 else f"beam {beam_size} (length penalty {args.length_penalty})"
        print(f"{name:32s} BLEU {result['bleu']:6.2f}   chrF {result['chrf']:6.2f}   ({result['seconds']} s)")
    print("\n| English | reference | " + " | ".join("greedy" if b == 1 else f"beam {b}" for b in results) + " |")
    print("|---" * (2 + len(results)) + "|")
    step = max(len(pairs) // max(args.examples, 1), 1)
    for i in range(0, min(len(pairs), step * args.examples), step):
        row = [pairs[i][0], pairs[i][1]] + [outputs[b][i] for b in results]
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    translation = plot_attention(model, processor, args.heatmap_sentence, out_dir / "attention.png", device)
    print(f"\nattention of '{args.heatmap_sentence}' -> '{translation}' drawn in {out_dir / 'attention.png'}")


def main(argv=None):
    """Run, turning errors a user can cause into one line on stderr."""
    try:
        evaluate(parse_args(argv))
    except (RunError, DataError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
