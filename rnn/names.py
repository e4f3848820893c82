"""The surname -> language data: load, deduplicate, split by language, turn characters into ids and batches."""

import random
from collections import Counter

import torch

from data import fetch

PAD, UNKNOWN = 0, 1  # character ids reserved for padding and for characters never seen in training


def load_pairs():
    """All distinct (name, language) pairs of the 18-language names dataset, in a fixed order."""
    folder = fetch("names")
    pairs = set()
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.strip()
            if name:
                pairs.add((name, path.stem))
    return sorted(pairs)


def stratified_split(pairs, seed, validation_fraction=0.1, test_fraction=0.1):
    """Split each language's names on its own (seeded), so every split keeps the class proportions."""
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


def class_counts(pairs):
    """How many names each language has, as a dict sorted by language."""
    counts = Counter(language for _, language in pairs)
    return dict(sorted(counts.items()))


class Alphabet:
    """Characters <-> ids; id 0 is padding, id 1 stands for a character not seen in training."""

    def __init__(self, characters):
        self.characters = "".join(sorted(set(characters)))
        self.index = {character: i + 2 for i, character in enumerate(self.characters)}

    def __len__(self):
        return len(self.characters) + 2

    def unknown_characters(self, name):
        """The characters of `name` that are not in the alphabet (empty string when all are)."""
        return "".join(sorted({character for character in name if character not in self.index}))

    def encode(self, name):
        """A name as a list of character ids (unseen characters become UNKNOWN)."""
        return [self.index.get(character, UNKNOWN) for character in name]


def make_batch(names, alphabet):
    """Pad a list of names into ids (B, T) and lengths (B,)."""
    encoded = [alphabet.encode(name) for name in names]
    lengths = torch.tensor([len(ids) for ids in encoded])  # (B,)
    character_ids = torch.full((len(names), int(lengths.max())), PAD, dtype=torch.long)  # (B, T)
    for row, ids in enumerate(encoded):
        character_ids[row, : len(ids)] = torch.tensor(ids)
    return character_ids, lengths


def encode_split(pairs, alphabet, languages):
    """A split as padded ids (N, T), lengths (N,) and label ids (N,)."""
    character_ids, lengths = make_batch([name for name, _ in pairs], alphabet)
    language_index = {language: i for i, language in enumerate(languages)}
    labels = torch.tensor([language_index[language] for _, language in pairs])  # (N,)
    return character_ids, lengths, labels
