"""The chapter's two tasks as data: Jane Austen's novels as characters, and the adding problem's random sequences."""

from dataclasses import dataclass

import torch

from data import fetch

# Three novels by one author: one voice and one spelling, 2.0M characters, enough that a ten-minute run sees each
# character only a few times (so the test bpc measures generalisation, not memory), and samples easy to judge.
DEFAULT_BOOKS = ("austen-emma.txt", "austen-persuasion.txt", "austen-sense.txt")
VALIDATION_FRACTION = 0.05  # the second-to-last 5% of each book
TEST_FRACTION = 0.05  # the last 5% of each book


@dataclass
class CharCorpus:
    """Train, validation and test text of the chosen books, and the character vocabulary shared by all three."""

    vocabulary: str
    train: str
    validation: str
    test: str

    def encode(self, text: str) -> list[int]:
        """Character ids; a ValueError names the first character the vocabulary does not hold."""
        index = {character: position for position, character in enumerate(self.vocabulary)}
        unknown = [character for character in text if character not in index]
        if unknown:
            raise ValueError(f"character {unknown[0]!r} is not in the model's vocabulary")
        return [index[character] for character in text]

    def decode(self, ids) -> str:
        """The text of a sequence of character ids."""
        return "".join(self.vocabulary[i] for i in ids)


def load_corpus(books=DEFAULT_BOOKS) -> CharCorpus:
    """Read the books through the data helper and hold out the end of each one: ..train.. | validation | test."""
    folder = fetch("gutenberg")
    train_parts, validation_parts, test_parts = [], [], []
    for book in books:
        path = folder / book
        if not path.is_file():
            raise FileNotFoundError(f"no book {book!r} in the Gutenberg selection ({folder})")
        text = path.read_text(encoding="utf-8")
        validation_start = int(len(text) * (1 - VALIDATION_FRACTION - TEST_FRACTION))
        test_start = int(len(text) * (1 - TEST_FRACTION))
        train_parts.append(text[:validation_start])
        validation_parts.append(text[validation_start:test_start])
        test_parts.append(text[test_start:])
    vocabulary = "".join(sorted(set("".join(train_parts + validation_parts + test_parts))))
    return CharCorpus(vocabulary, "\n\n".join(train_parts), "\n\n".join(validation_parts), "\n\n".join(test_parts))


def into_streams(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a long id sequence into batch_size contiguous streams, one per row, so state can be carried along."""
    stream_length = len(ids) // batch_size
    return ids[: stream_length * batch_size].view(batch_size, stream_length)  # (B, N // B)


def adding_batch(batch_size: int, length: int, generator: torch.Generator | None = None):
    """The adding problem: values in [0, 1), one marker in each half; the target is the sum of the two marked values."""
    values = torch.rand(batch_size, length, generator=generator)  # (B, T)
    first = torch.randint(0, length // 2, (batch_size,), generator=generator)  # (B,)
    second = torch.randint(length // 2, length, (batch_size,), generator=generator)  # (B,)
    markers = torch.zeros(batch_size, length)  # (B, T)
    rows = torch.arange(batch_size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = torch.stack([values, markers], dim=-1)  # (B, T, 2)
    targets = values[rows, first] + values[rows, second]  # (B,)
    return inputs, targets
