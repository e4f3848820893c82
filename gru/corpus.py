"""MSRA NER for the tagger: read and repair BMES tags, split long sentences, build the vocabulary, batch by length."""

import functools
import re
from collections import Counter
from pathlib import Path

import torch

from data import fetch

ENTITY_TYPES = ["PER", "LOC", "ORG"]
# BMES: B(egin), M(iddle), E(nd) of a multi-character entity, S(ingle)-character entity, O(utside) any entity
TAGS = ["O"] + [f"{position}-{kind}" for kind in ENTITY_TYPES for position in "BMES"]
TAG_SET = set(TAGS)
PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1 in every vocabulary
PUNCTUATION = set("。！？；，、：…!?;,:")


# one well-formed BMES path: entities (O | S-X | B-X M-X ... E-X) separated by spaces
WELL_FORMED = re.compile(r"(?:O|S-\w+|B-(\w+)(?: M-\1)* E-\1)(?: (?:O|S-\w+|B-(\w+)(?: M-\2)* E-\2))*")


def read_sentences(path: Path) -> tuple[list[tuple[list[str], list[str]]], int]:
    """Sentences of a `char tag` file as (chars, tags), ill-formed tag paths repaired; also how many were."""
    sentences, repaired = [], 0
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        fields = block.split()
        if not fields:
            continue
        chars, tags = fields[0::2], fields[1::2]
        if len(fields) != 2 * block.strip().count("\n") + 2 or not TAG_SET.issuperset(tags):
            raise ValueError(f"{path.name}: expected 'char TAG' lines with BMES tags near {block[:40]!r}")
        if not WELL_FORMED.fullmatch(" ".join(tags)):
            tags = repair_tags(tags)
            repaired += 1
        sentences.append((chars, tags))
    return sentences, repaired


@functools.lru_cache(maxsize=2)
def read_cached(path: Path):
    """read_sentences, once per file and process (the tests and the eval script read the same file often)."""
    return read_sentences(path)


def repair_tags(tags: list[str]) -> list[str]:
    """Make a BMES path well formed: an entity cut short is closed where it stops, an orphan M-/E- opens one."""
    spans = tags_to_spans(tags)
    return spans_to_tags(spans, len(tags))


def tags_to_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, type) of each entity, read leniently: a new B-/S- or any change of type ends one."""
    spans, start, kind = [], None, None
    for position, tag in enumerate(tags + ["O"]):
        prefix, _, tag_kind = tag.partition("-")
        continues = start is not None and tag_kind == kind and prefix in "ME"
        if start is not None and not continues:
            spans.append((start, position, kind))  # the open entity ends before this character
            start = None
        if prefix in "BS" or (prefix in "ME" and start is None):
            start, kind = position, tag_kind  # an M- or E- with nothing open starts an entity too
        if prefix in "ES" and start is not None:
            spans.append((start, position + 1, kind))
            start = None
    return spans


def spans_to_tags(spans: list[tuple[int, int, str]], length: int) -> list[str]:
    """The well-formed BMES path of the given entities."""
    tags = ["O"] * length
    for start, end, kind in spans:
        if end - start == 1:
            tags[start] = f"S-{kind}"
        else:
            tags[start:end] = [f"B-{kind}"] + [f"M-{kind}"] * (end - start - 2) + [f"E-{kind}"]
    return tags


def split_points(chars: list[str], max_length: int, tags: list[str] | None = None) -> list[int]:
    """Where to cut a long sentence: after the last punctuation mark that fits, else at the last safe character."""
    cuts, start = [], 0
    while len(chars) - start > max_length:
        window = range(start + max_length, start, -1)  # candidate cut positions, longest piece first
        safe = [cut for cut in window if tags is None or tags[cut - 1][0] in "OES"]  # never inside an entity
        at_punctuation = [cut for cut in safe if chars[cut - 1] in PUNCTUATION]
        cut = (at_punctuation or safe or [start + max_length])[0]
        cuts.append(cut)
        start = cut
    return cuts


def split_long(chars, tags, max_length):
    """Pieces of at most max_length characters, cut at punctuation (never mid-entity) rather than truncated."""
    if len(chars) <= max_length:
        return [(chars, tags)]
    bounds = [0, *split_points(chars, max_length, tags), len(chars)]
    return [(chars[a:b], tags[a:b]) for a, b in zip(bounds, bounds[1:])]


def build_vocab(sentences, min_count: int = 2) -> list[str]:
    """<pad>, <unk>, then every character seen at least min_count times, sorted: the same list on every machine."""
    counts = Counter(char for chars, _ in sentences for char in chars)
    return [PAD, UNK] + sorted(char for char, count in counts.items() if count >= min_count)


def encode(chars: list[str], char_to_id: dict[str, int]) -> list[int]:
    """Character ids, <unk> for characters outside the vocabulary."""
    return [char_to_id.get(char, 1) for char in chars]


def load_file(name: str, max_length: int, log=print):
    """The sentences of msra_<name>.txt (train or test), long ones cut into pieces of at most max_length."""
    sentences, repaired = read_cached(fetch("msra") / f"msra_{name}.txt")
    pieces = [piece for chars, tags in sentences for piece in split_long(chars, tags, max_length)]
    log(f"msra_{name}.txt: {len(sentences)} sentences, {repaired} ill-formed tag paths repaired, "
        f"{len(pieces) - len(sentences)} extra pieces from splitting at {max_length} characters")
    return pieces


def load_msra(validation_size: int, max_length: int, seed: int = 0, log=print):
    """Train and validation sentences: validation is a seeded random sample of the train file."""
    sentences = load_file("train", max_length, log)
    if not 0 < validation_size < len(sentences):
        raise ValueError(f"--validation-size must be between 1 and {len(sentences) - 1}")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    validation = [sentences[i] for i in sorted(order[:validation_size])]
    train = [sentences[i] for i in sorted(order[validation_size:])]
    return train, validation


def make_batches(sentences, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Indices of sentences in batches of similar length (little padding), in random order when given a generator.

    Shuffle, cut into chunks of 50 batches, sort each chunk by length, cut into batches, shuffle the batches.
    """
    order = list(range(len(sentences)))
    if generator is not None:
        order = torch.randperm(len(sentences), generator=generator).tolist()
    chunk = 50 * batch_size
    batches = []
    for begin in range(0, len(order), chunk):
        part = sorted(order[begin : begin + chunk], key=lambda i: len(sentences[i][0]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def collate(sentences, indices, char_to_id, tag_to_id, device):
    """Padded tensors of one batch: char ids (B, T), tag ids (B, T), lengths (B,) on the CPU."""
    picked = [sentences[i] for i in indices]
    lengths = torch.tensor([len(chars) for chars, _ in picked])  # (B,)
    char_ids = torch.zeros(len(picked), int(lengths.max()), dtype=torch.long)  # (B, T), 0 = <pad>
    tag_ids = torch.zeros_like(char_ids)  # (B, T), padding tagged O and masked out
    for row, (chars, tags) in enumerate(picked):
        char_ids[row, : len(chars)] = torch.tensor(encode(chars, char_to_id))
        tag_ids[row, : len(tags)] = torch.tensor([tag_to_id[tag] for tag in tags])
    return char_ids.to(device), tag_ids.to(device), lengths
