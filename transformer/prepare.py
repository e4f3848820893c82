"""The data pipeline: Tatoeba pairs -> a split by English sentence -> a shared SentencePiece vocabulary -> batches.

Run on its own to see the split sizes and a tokenized example:  python transformer/prepare.py
"""

import argparse
import io
import random
import sys

import sentencepiece as spm
import torch

from data import DataError, fetch
from transformer.runs import int_in_range, seed_int

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def load_pairs() -> list[tuple[str, str]]:
    """All (English, Spanish) pairs of Tatoeba's spa.tsv (english<TAB>spanish<TAB>attribution)."""
    path = fetch("tatoeba") / "spa.tsv"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip() and fields[1].strip():
            pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise DataError(f"no sentence pairs found in {path}")
    return pairs


def split_pairs(pairs, seed: int = 0, valid_fraction: float = 0.03, test_fraction: float = 0.03) -> dict:
    """Split reproducibly BY ENGLISH SENTENCE: all translations of one English sentence land in the same split.

    Otherwise "I'm hungry." -> "Tengo hambre." could be trained on and then tested as "I'm hungry." -> "Estoy
    hambriento.", and the test would reward memorising sources rather than translating.
    """
    english = sorted({source for source, _ in pairs})
    random.Random(seed).shuffle(english)
    num_valid, num_test = int(len(english) * valid_fraction), int(len(english) * test_fraction)
    split_of = {sentence: "valid" for sentence in english[:num_valid]}
    split_of.update({sentence: "test" for sentence in english[num_valid : num_valid + num_test]})
    splits = {"train": [], "valid": [], "test": []}
    for pair in pairs:
        splits[split_of.get(pair[0], "train")].append(pair)
    return splits


def train_tokenizer(pairs, vocab_size: int, seed: int = 0) -> bytes:
    """One BPE vocabulary for both languages (so the embedding can be shared); returns the model file's bytes."""
    sentences = [sentence for pair in pairs for sentence in pair]
    random.Random(seed).shuffle(sentences)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:  # e.g. more pieces asked for than these sentences can give
        reason = str(error).split("] ", 1)[-1].split(" Increase vocab_size")[0].strip()
        raise ValueError(f"--vocab-size {vocab_size}: SentencePiece cannot build this vocabulary ({reason})") from None
    return model.getvalue()


def load_tokenizer(model_bytes: bytes) -> spm.SentencePieceProcessor:
    """A SentencePiece processor from a model's bytes (as stored in the checkpoint)."""
    return spm.SentencePieceProcessor(model_proto=model_bytes)


def encode_pairs(processor, pairs, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(English, Spanish) -> (source ids + EOS, BOS + target ids + EOS); pairs longer than max_len are dropped."""
    sources = processor.encode([source for source, _ in pairs])
    targets = processor.encode([target for _, target in pairs])
    encoded = []
    for source, target in zip(sources, targets):
        source, target = source + [EOS_ID], [BOS_ID] + target + [EOS_ID]
        if len(source) <= max_len and len(target) <= max_len:
            encoded.append((source, target))
    return encoded


def token_batches(encoded, max_tokens: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Group pairs of similar length into batches of at most max_tokens padded target tokens (source likewise).

    Sorting by length (with random tie-breaking) wastes almost no compute on padding; the batch ORDER is
    then shuffled so that every epoch still mixes short and long sentences.
    """
    noise = torch.rand(len(encoded), generator=generator).tolist() if generator is not None else [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][1]), len(encoded[i][0]), noise[i]))
    batches, current, longest = [], [], 0
    for i in order:
        length = max(len(encoded[i][0]), len(encoded[i][1]))
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def collate(encoded, indices, device="cpu"):
    """Pad one batch: source (B, Ts), decoder input BOS..y_n (B, Tt), decoder target y_1..EOS (B, Tt)."""
    sources = [torch.tensor(encoded[i][0]) for i in indices]
    targets = [torch.tensor(encoded[i][1]) for i in indices]
    source = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=PAD_ID)
    target = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=PAD_ID)
    return source.to(device), target[:, :-1].to(device), target[:, 1:].to(device)


def main(argv=None):
    """Show the split sizes and one tokenized pair."""
    parser = argparse.ArgumentParser(description="Show the Tatoeba English-Spanish split and the tokenizer.")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the split, in [0, 2**32)")
    parser.add_argument("--vocab-size", type=int_in_range(100, 1_000_000), default=8000,
                        help="size of the shared BPE vocabulary")
    args = parser.parse_args(argv)
    try:
        splits = split_pairs(load_pairs(), args.seed)
        processor = load_tokenizer(train_tokenizer(splits["train"], args.vocab_size, args.seed))
    except (DataError, ValueError) as error:
        sys.exit(f"error: {error}")
    for name, split in splits.items():
        print(f"{name:5s}: {len(split):6d} pairs, {len({s for s, _ in split}):6d} distinct English sentences")
    english, spanish = splits["train"][12345]
    print(english, "->", processor.encode(english, out_type=str))
    print(spanish, "->", processor.encode(spanish, out_type=str))


if __name__ == "__main__":
    main()
