"""Instruction sets from the corpora the other chapters train on, with their held-out splits kept held out.

    python llm/instructions.py                 # the size of every task's splits and one rendered example of each

Four tasks, each a conversation (a user turn, an assistant turn) and a way to score the answer:

    translation  "Translate to Spanish: ..." (and to English), Tatoeba; BLEU on the transformer chapter's test pairs
    surnames     "Which language does the surname X come from?"; accuracy on the rnn chapter's test names
    entities     "List the person, place and organisation names in: ..." (MSRA); strict entity F1, as the gru
                 chapter scores its tagger, on its test sentences
    chitchat     open conversation between two people (chitchat-dataset); the loss of the held-out answers

A chapter's split is reproduced here line for line rather than imported (a chapter imports nothing from another);
tests/test_llm_instructions.py checks that it selects exactly the items the chapter's own code selects, so no test
item is ever trained on.
"""

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from data import DataError, fetch

TASKS = ("translation", "surnames", "entities", "chitchat")
SPLIT_SEED = 0  # every chapter splits with seed 0 by default


@dataclass
class Example:
    """One conversation to train on or to score: messages [{"role": ..., "content": ...}, ...]."""

    task: str
    messages: list
    reference: object = None  # what the answer is scored against (a string, a language, gold tags)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- translation: the transformer chapter's split


@lru_cache(maxsize=1)
def tatoeba_pairs() -> tuple:
    """All (English, Spanish) pairs of Tatoeba's spa.tsv, read as transformer/prepare.py reads them."""
    path = fetch("tatoeba") / "spa.tsv"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip() and fields[1].strip():
            pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise DataError(f"no sentence pairs found in {path}")
    return tuple(pairs)


def tatoeba_split(pairs, seed: int = SPLIT_SEED, valid_fraction: float = 0.03, test_fraction: float = 0.03) -> dict:
    """The transformer chapter's split: by English sentence, the sorted sentences shuffled with random.Random(seed)."""
    english = sorted({source for source, _ in pairs})
    random.Random(seed).shuffle(english)
    num_valid, num_test = int(len(english) * valid_fraction), int(len(english) * test_fraction)
    split_of = {sentence: "valid" for sentence in english[:num_valid]}
    split_of.update({sentence: "test" for sentence in english[num_valid : num_valid + num_test]})
    splits = {"train": [], "valid": [], "test": []}
    for pair in pairs:
        splits[split_of.get(pair[0], "train")].append(pair)
    return splits


def translation_example(english: str, spanish: str, to_spanish: bool = True) -> Example:
    if to_spanish:
        return Example("translation", [{"role": "user", "content": f"Translate to Spanish: {english}"},
                                       {"role": "assistant", "content": spanish}], spanish, {"source": english})
    return Example("translation", [{"role": "user", "content": f"Translate to English: {spanish}"},
                                   {"role": "assistant", "content": english}], english, {"source": spanish})


# ---------------------------------------------------------------- surnames: the rnn chapter's split


@lru_cache(maxsize=1)
def surname_pairs() -> tuple:
    """All distinct (name, language) pairs of the 18 name lists, sorted, as rnn/names.py reads them."""
    folder = fetch("names")
    pairs = set()
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.strip()
            if name:
                pairs.add((name, path.stem))
    return tuple(sorted(pairs))


def surname_split(pairs, seed: int = SPLIT_SEED, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> dict:
    """The rnn chapter's stratified split: each language's sorted names shuffled by one random.Random(seed)."""
    by_language = {}
    for name, language in pairs:
        by_language.setdefault(language, []).append(name)
    generator = random.Random(seed)
    splits = {"train": [], "validation": [], "test": []}
    for language in sorted(by_language):
        names = sorted(by_language[language])
        generator.shuffle(names)
        validation_count = max(1, round(len(names) * validation_fraction))
        test_count = max(1, round(len(names) * test_fraction))
        splits["test"] += [(name, language) for name in names[:test_count]]
        splits["validation"] += [(name, language) for name in names[test_count:test_count + validation_count]]
        splits["train"] += [(name, language) for name in names[test_count + validation_count:]]
    return splits


def surname_example(name: str, language: str) -> Example:
    question = f"Which language does the surname {name} come from? Answer with one word."
    return Example("surnames", [{"role": "user", "content": question},
                                {"role": "assistant", "content": language}], language)


SURNAME_LANGUAGES = ("Arabic", "Chinese", "Czech", "Dutch", "English", "French", "German", "Greek", "Irish", "Italian",
                     "Japanese", "Korean", "Polish", "Portuguese", "Russian", "Scottish", "Spanish", "Vietnamese")


def surname_is_right(answer: str, language: str) -> bool:
    """The first of the 18 language names the answer mentions (any case) is the right one.

    "Russian" and "The surname Abaimov is Russian." are right; "Polish or Russian" and "I do not know" are not.
    """
    known = {name.lower() for name in SURNAME_LANGUAGES}
    named = [word for word in re.findall(r"[^\W\d_]+", answer.lower()) if word in known]
    return bool(named) and named[0] == language.lower()


# ---------------------------------------------------------------- entities: the gru chapter's test sentences

ENTITY_TYPES = ("PER", "LOC", "ORG")
ENTITY_WORDS = {"PER": "person", "LOC": "place", "ORG": "organisation"}
ENTITY_TAGS = {"O"} | {f"{position}-{kind}" for kind in ENTITY_TYPES for position in "BMES"}
WELL_FORMED = re.compile(r"(?:O|S-\w+|B-(\w+)(?: M-\1)* E-\1)(?: (?:O|S-\w+|B-(\w+)(?: M-\2)* E-\2))*")
PUNCTUATION = set("。！？；，、：…!?;,:")
MSRA_MAX_LENGTH = 100  # the gru chapter's --max-length: longer sentences are cut into pieces at punctuation


def tags_to_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, type) of each entity of a BMES path, read leniently (as gru/corpus.py reads it)."""
    spans, start, kind = [], None, None
    for position, tag in enumerate(tags + ["O"]):
        prefix, _, tag_kind = tag.partition("-")
        continues = start is not None and tag_kind == kind and prefix in "ME"
        if start is not None and not continues:
            spans.append((start, position, kind))
            start = None
        if prefix in "BS" or (prefix in "ME" and start is None):
            start, kind = position, tag_kind
        if prefix in "ES" and start is not None:
            spans.append((start, position + 1, kind))
            start = None
    return spans


def spans_to_tags(spans, length: int) -> list[str]:
    """The well-formed BMES path of the given entities."""
    tags = ["O"] * length
    for start, end, kind in spans:
        tags[start:end] = [f"S-{kind}"] if end - start == 1 else \
            [f"B-{kind}"] + [f"M-{kind}"] * (end - start - 2) + [f"E-{kind}"]
    return tags


def read_msra(name: str) -> list[tuple[list[str], list[str]]]:
    """msra_<name>.txt as (characters, tags) sentences, ill-formed tag paths repaired as the gru chapter does."""
    path = fetch("msra") / f"msra_{name}.txt"
    sentences = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        fields = block.split()
        if not fields:
            continue
        chars, tags = fields[0::2], fields[1::2]
        if len(fields) != 2 * block.strip().count("\n") + 2 or not ENTITY_TAGS.issuperset(tags):
            raise DataError(f"{path.name}: expected 'char TAG' lines with BMES tags near {block[:40]!r}")
        if not WELL_FORMED.fullmatch(" ".join(tags)):
            tags = spans_to_tags(tags_to_spans(tags), len(tags))
        sentences.append((chars, tags))
    return sentences


def cut_points(chars, tags, max_length: int) -> list[int]:
    """Where the gru chapter cuts a long sentence: after the last punctuation that fits, never inside an entity."""
    cuts, start = [], 0
    while len(chars) - start > max_length:
        window = range(start + max_length, start, -1)
        safe = [cut for cut in window if tags[cut - 1][0] in "OES"]
        at_punctuation = [cut for cut in safe if chars[cut - 1] in PUNCTUATION]
        cut = (at_punctuation or safe or [start + max_length])[0]
        cuts.append(cut)
        start = cut
    return cuts


@lru_cache(maxsize=2)
def msra_pieces(name: str, max_length: int = MSRA_MAX_LENGTH) -> tuple:
    """The sentences of msra_<name>.txt cut into pieces of at most max_length characters, as the gru chapter does."""
    pieces = []
    for chars, tags in read_msra(name):
        bounds = [0, *cut_points(chars, tags, max_length), len(chars)] if len(chars) > max_length else [0, len(chars)]
        pieces += [(chars[a:b], tags[a:b]) for a, b in zip(bounds, bounds[1:])]
    return tuple(pieces)


def msra_split(validation_size: int = 2500, seed: int = SPLIT_SEED) -> dict:
    """The gru chapter's sets: its validation is a seeded sample of the train file; its test is the test file."""
    train_pieces = msra_pieces("train")
    order = torch.randperm(len(train_pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"train": [train_pieces[i] for i in sorted(order[validation_size:])],
            "validation": [train_pieces[i] for i in sorted(order[:validation_size])],
            "test": list(msra_pieces("test"))}


def entity_answer(chars: list[str], tags: list[str]) -> str:
    """The answer the model learns: one line per type, the distinct names in order of appearance, or none."""
    names = {kind: [] for kind in ENTITY_TYPES}
    for start, end, kind in tags_to_spans(tags):
        surface = "".join(chars[start:end])
        if surface not in names[kind]:
            names[kind].append(surface)
    return "\n".join(f"{ENTITY_WORDS[kind]}: {', '.join(names[kind]) or 'none'}" for kind in ENTITY_TYPES)


def entity_example(chars: list[str], tags: list[str]) -> Example:
    question = f"List the person, place and organisation names in: {''.join(chars)}"
    return Example("entities", [{"role": "user", "content": question},
                                {"role": "assistant", "content": entity_answer(chars, tags)}], list(tags),
                   {"chars": list(chars)})


def tags_from_answer(answer: str, chars: list[str]) -> list[str]:
    """Read an answer back into tags: every occurrence of every named string is tagged (longest names first)."""
    words = {word: kind for kind, word in ENTITY_WORDS.items()} | {"organization": "ORG"}
    named = []
    for line in answer.splitlines():
        key, _, values = line.partition(":")
        kind = words.get(key.strip().lower())
        if kind is None:
            continue
        for surface in re.split(r"[,，、]", values):
            surface = surface.strip()
            if surface and surface.lower() != "none":
                named.append((surface, kind))
    text, taken, spans = "".join(chars), [False] * len(chars), []
    for surface, kind in sorted(named, key=lambda item: -len(item[0])):
        for match in re.finditer(re.escape(surface), text):
            start, end = match.start(), match.end()
            if not any(taken[start:end]):
                taken[start:end] = [True] * (end - start)
                spans.append((start, end, kind))
    return spans_to_tags(sorted(spans), len(chars))


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Strict entity F1 (seqeval, IOBES scheme): an entity counts only when its start, end and type all match."""
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOBES

    def to_iobes(tags):
        return [("I-" + tag[2:]) if tag.startswith("M-") else tag for tag in tags]

    return float(f1_score([to_iobes(t) for t in gold], [to_iobes(t) for t in predicted], mode="strict",
                          scheme=IOBES, zero_division=0))


# ---------------------------------------------------------------- chitchat: open conversation


@lru_cache(maxsize=1)
def chitchat_conversations() -> tuple:
    """Every conversation of chitchat-dataset with both people speaking, as (id, [turn text, ...]) sorted by id.

    A turn is what one person wrote before the other answered (its messages joined by line breaks).
    """
    raw = json.loads((fetch("chitchat") / "dataset.json").read_text(encoding="utf-8"))
    conversations = []
    for key in sorted(raw):
        turns, senders = [], []
        for turn in raw[key]["messages"]:
            text = "\n".join(message["text"].strip() for message in turn if message["text"].strip())
            if not text:
                continue
            if senders and senders[-1] == turn[0]["sender"]:
                turns[-1] += "\n" + text
            else:
                turns.append(text)
                senders.append(turn[0]["sender"])
        if len(turns) >= 2:
            conversations.append((key, tuple(turns)))
    return tuple(conversations)


def chitchat_split(conversations, seed: int = SPLIT_SEED, valid_fraction: float = 0.05,
                   test_fraction: float = 0.05) -> dict:
    """Conversations (sorted by id) shuffled with random.Random(seed): the first ones held out."""
    order = list(conversations)
    random.Random(seed).shuffle(order)
    num_valid, num_test = int(len(order) * valid_fraction), int(len(order) * test_fraction)
    return {"valid": order[:num_valid], "test": order[num_valid : num_valid + num_test],
            "train": order[num_valid + num_test :]}


def chitchat_example(turns, max_turns: int = 6) -> Example:
    """The first max_turns turns: the first speaker is the user, the other the assistant."""
    count = min(len(turns), max_turns)
    turns = turns[: count - count % 2]  # end on an assistant turn
    roles = ["user", "assistant"]
    return Example("chitchat", [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)])


# ---------------------------------------------------------------- any chat dataset `datasets` can open

ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
              "model": "assistant", "system": "system"}


def hf_examples(name: str, config: str | None = None, split: str = "train", limit: int | None = None) -> list:
    """Conversations of a Hugging Face dataset (a hub name or a local folder) with a messages or conversations
    column: lists of {"role", "content"} (or ShareGPT's {"from", "value"})."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - not found, no network, a bad config or split: one line
        raise DataError(f"--hf-dataset {name}: {str(error).strip().splitlines()[0][:200]}") from None
    column = next((c for c in ("messages", "conversations") if c in dataset.column_names), None)
    if column is None:
        raise DataError(f"--hf-dataset {name}: no messages or conversations column (it has "
                        f"{', '.join(dataset.column_names)})")
    examples = []
    for row in dataset.select(range(min(len(dataset), limit or len(dataset)))):
        messages = []
        for turn in row[column]:
            role = ROLE_NAMES.get(str(turn.get("role", turn.get("from", ""))).lower())
            content = turn.get("content", turn.get("value"))
            if role is None or not isinstance(content, str):
                raise DataError(f"--hf-dataset {name}: a turn without a known role and text content: {turn!r:.80}")
            messages.append({"role": role, "content": content})
        if any(message["role"] == "assistant" for message in messages):
            examples.append(Example("hf", messages))
    if not examples:
        raise DataError(f"--hf-dataset {name}: no conversation has an assistant turn")
    return examples


# ---------------------------------------------------------------- the sets to train on and to score


def task_splits(task: str) -> dict:
    """The split of one task, named train / valid / test whatever the chapter calls them."""
    if task == "translation":
        return tatoeba_split(tatoeba_pairs())
    if task == "surnames":
        splits = surname_split(surname_pairs())
        return {"train": splits["train"], "valid": splits["validation"], "test": splits["test"]}
    if task == "entities":
        splits = msra_split()
        return {"train": splits["train"], "valid": splits["validation"], "test": splits["test"]}
    if task == "chitchat":
        return chitchat_split(chitchat_conversations())
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def make_example(task: str, item, rng: random.Random | None = None) -> Example:
    """The conversation of one item of a task's split (translation goes both ways in training: rng picks)."""
    if task == "translation":
        return translation_example(*item, to_spanish=rng is None or rng.random() < 0.5)
    if task == "surnames":
        return surname_example(*item)
    if task == "entities":
        return entity_example(*item)
    return chitchat_example(item[1])


def sample_examples(task: str, split: str, count: int | None, seed: int = 0) -> list:
    """`count` items of a task's split drawn at random with `seed` (all of them for None), in split order.

    The test and valid sets are drawn the same way for every model, so every model answers the same questions.
    Only a training set goes both ways in translation; a held-out one asks for Spanish, as the transformer
    chapter does.
    """
    items = task_splits(task)[split]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(items)), count)) if count is not None and count < len(items) \
        else range(len(items))
    direction_rng = random.Random(seed + 1) if split == "train" else None
    return [make_example(task, items[i], direction_rng) for i in chosen]


def training_mixture(counts: dict, seed: int = 0) -> list:
    """A shuffled list of training conversations: counts[task] of each task, drawn from its train split only."""
    examples = []
    for task, count in counts.items():
        if count:
            examples += sample_examples(task, "train", count, seed)
    random.Random(seed).shuffle(examples)
    return examples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, action="append", help="show only this task (repeatable)")
    args = parser.parse_args(argv)
    try:
        for task in args.task or TASKS:
            splits = task_splits(task)
            sizes = ", ".join(f"{name} {len(items):,}" for name, items in splits.items())
            print(f"{task}: {sizes}")
            for message in sample_examples(task, "test", 1)[0].messages[:2]:
                print(f"  {message['role']}: {message['content'][:200]!r}")
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
