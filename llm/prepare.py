"""The data pipeline, one stage at a time: corpus -> BPE tokenizer -> memory-mapped token files.

    python llm/prepare.py tokenizer   --vocab-size 4096     # train (or reuse) the SentencePiece BPE model
    python llm/prepare.py pretokenize --vocab-size 4096     # encode train/valid/test into .bin token files

Each stage writes a small stamp (JSON) of its inputs beside its output; when a later call finds the same
stamp, the stage is reused instead of recomputed.
"""

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
TOKEN_MAGIC = b"HCLTOKv1"  # 8 bytes, then the item size (int64): 2 for uint16, 4 for uint32
HEADER_BYTES = 16
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TINYSTORIES_FILES = {"train": "TinyStories-train.txt", "valid": "TinyStories-valid.txt"}
STORY_SEPARATOR = "<|endoftext|>"


class PrepareError(Exception):
    """A problem the user can fix (bad text file, unreachable corpus); printed as one line."""


@dataclass
class PreparedData:
    folder: Path
    tokenizer_path: Path
    token_files: dict  # split -> Path of its .bin file
    text_files: dict  # split -> Path of its raw text (for bytes and words of bits-per-byte / word perplexity)
    vocab_size: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids up to 65,535; a larger vocabulary needs uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_token_file(path: Path, token_ids, vocab_size: int) -> None:
    """Write ids as a header + flat array of uint16/uint32, atomically (temp file then rename)."""
    dtype = token_dtype(vocab_size)
    array = np.asarray(token_ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    temporary = Path(str(path) + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(TOKEN_MAGIC + np.int64(dtype.itemsize).tobytes())
        handle.write(array.astype(dtype).tobytes())
    os.replace(temporary, path)


def read_token_file(path: Path) -> np.ndarray:
    """Memory-map a token file: the OS pages in only the windows a batch touches."""
    with open(path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != TOKEN_MAGIC:
        raise PrepareError(f"{path} is not a token file written by llm/prepare.py")
    itemsize = int(np.frombuffer(header[8:], dtype=np.int64)[0])
    if itemsize not in (2, 4):
        raise PrepareError(f"{path} has an unknown token size {itemsize}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if os.path.getsize(path) == HEADER_BYTES:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES)


def read_text_file(path: Path) -> str:
    """Read a user's UTF-8 text; refuse empty or binary files with a clear message."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise PrepareError(f"cannot read text file {path}: {error.strerror}") from None
    if b"\x00" in raw:
        raise PrepareError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise PrepareError(f"{path} is empty")
    return text


def split_text_file(text_path: Path, folder: Path) -> dict:
    """Split a user's text by lines: the last 10% becomes validation (first half) and test (second half)."""
    lines = read_text_file(text_path).splitlines(keepends=True)
    if len(lines) < 10:  # too few lines to split: split by characters instead
        text = "".join(lines)
        cut_valid, cut_test = int(len(text) * 0.9), int(len(text) * 0.95)
        parts = [text[:cut_valid], text[cut_valid:cut_test], text[cut_test:]]
    else:
        cut_valid, cut_test = int(len(lines) * 0.9), int(len(lines) * 0.95)
        parts = ["".join(lines[:cut_valid]), "".join(lines[cut_valid:cut_test]), "".join(lines[cut_test:])]
    if not parts[1].strip() or not parts[2].strip():
        raise PrepareError(f"{text_path} is too short to split into train, validation and test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in zip(SPLITS, parts):
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text(part, encoding="utf-8")
    return paths


def fetch_tinystories(folder: Path, base_url: str) -> dict:
    """Download TinyStories train/valid (valid doubles as test); stories are separated by <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, name in TINYSTORIES_FILES.items():
        target = folder / name
        if not target.exists():
            temporary = Path(str(target) + ".tmp")
            try:
                with urllib.request.urlopen(base_url + name, timeout=60) as response, open(temporary, "wb") as handle:
                    while chunk := response.read(1 << 20):
                        handle.write(chunk)
            except OSError as error:
                raise PrepareError(f"cannot download TinyStories from {base_url}: {error}") from None
            os.replace(temporary, target)
        paths[split] = target
    paths["test"] = paths["valid"]
    return paths


def corpus_text_files(dataset: str, text_file: str | None, data_root: Path) -> tuple[str, dict]:
    """Return (corpus name, split -> raw text path) for wikitext-2, tinystories or a user's --text-file."""
    if text_file:
        name = "text-" + file_sha256(Path(text_file))[:12] if Path(text_file).is_file() else "text"
        if not Path(text_file).is_file():
            raise PrepareError(f"text file {text_file} does not exist")
        return name, split_text_file(Path(text_file), data_root / name / "text")
    if dataset == "wikitext-2":
        from data import DataError, fetch

        try:
            folder = fetch("wikitext-2")
        except DataError as error:
            raise PrepareError(str(error)) from None
        return dataset, {split: folder / f"{split}.raw" for split in SPLITS}
    if dataset == "tinystories":
        base_url = os.environ.get("HCL_TINYSTORIES_URL", TINYSTORIES_URL)
        return dataset, fetch_tinystories(data_root / "tinystories" / "text", base_url)
    raise PrepareError(f"unknown dataset {dataset!r} (choose wikitext-2 or tinystories, or give --text-file)")


def stage_is_current(stamp_path: Path, stamp: dict, outputs) -> bool:
    """A stage is reused when its outputs exist and its recorded inputs equal the current ones."""
    if not stamp_path.exists() or not all(Path(output).exists() for output in outputs):
        return False
    try:
        return json.loads(stamp_path.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def iter_training_sentences(path: Path, max_sentences: int):
    """Yield the non-empty lines (stories stripped of their separator) the tokenizer learns from."""
    count = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.replace(STORY_SEPARATOR, "").strip()
            if line:
                yield line
                count += 1
                if count >= max_sentences:
                    return


def character_coverage(train_text: Path, vocab_size: int, target: float = 0.9995) -> float:
    """Share of the text's characters that get a token of their own (the rest fall back to bytes).

    0.9995 when the vocabulary has room; Chinese needs thousands of characters for that, so with a smaller
    vocabulary the coverage drops, down to SentencePiece's floor of 0.98.
    """
    from collections import Counter

    counts = Counter()
    for sentence in iter_training_sentences(train_text, 200_000):
        counts.update(sentence)
    covered = np.cumsum(sorted(counts.values(), reverse=True)) / sum(counts.values())  # (distinct characters,)
    room = vocab_size - 262 - 32  # leave the 256 byte tokens, 3 specials, newline and at least 32 merges
    needed = int(np.searchsorted(covered, target)) + 1  # characters it takes to reach the target
    if needed <= room:
        return target
    needed_floor = int(np.searchsorted(covered, 0.98)) + 1
    if needed_floor > room:
        raise PrepareError(f"this text needs {needed_floor} distinct characters to cover 98% of it; "
                           f"use --vocab-size {needed_floor + 400} or more")
    return max(0.98, float(covered[room - 1]) - 1e-6)


def train_tokenizer(train_text: Path, prefix: Path, vocab_size: int, quiet: bool = True) -> Path:
    """Learn BPE merges with SentencePiece: byte fallback (no unknown characters), digits split one by one."""
    import sentencepiece as spm

    model_path = Path(str(prefix) + ".model")
    stamp = {"train_sha256": file_sha256(train_text), "vocab_size": vocab_size, "version": 2}
    stamp_path = Path(str(prefix) + ".stamp.json")
    if stage_is_current(stamp_path, stamp, [model_path]):
        return model_path
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_training_sentences(train_text, 2_000_000),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # any character outside the vocabulary becomes its UTF-8 bytes <0x..>
            split_digits=True,  # 1984 -> 1 9 8 4, so numbers never get arbitrary merges
            user_defined_symbols=["\n"],  # newlines are kept as a token of their own
            normalization_rule_name="identity",  # no Unicode folding: decoding gives back the very text
            character_coverage=character_coverage(train_text, vocab_size),
            unk_id=0,
            eos_id=1,
            bos_id=-1,
            pad_id=-1,
            max_sentence_length=1 << 16,
            num_threads=max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))),
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as error:
        raise PrepareError(f"tokenizer training failed: {str(error).splitlines()[0]}") from None
    stamp_path.write_text(json.dumps(stamp))
    return model_path


def encode_text(processor, text: str) -> np.ndarray:
    """Encode text line by line, joining lines with the newline token; stories end with end-of-sequence."""
    newline_id, eos_id = processor.piece_to_id("\n"), processor.eos_id()
    ids: list[int] = []
    for story_index, story in enumerate(text.split(STORY_SEPARATOR)):
        if story_index > 0:
            ids.append(eos_id)
        lines = story.split("\n")
        for line_index, line_ids in enumerate(processor.encode(lines)):
            if line_index > 0:
                ids.append(newline_id)
            ids.extend(line_ids)
    return np.asarray(ids, dtype=np.int64)


def pretokenize(text_files: dict, tokenizer_path: Path, folder: Path, vocab_size: int) -> dict:
    """Encode each split once into folder/<split>.bin; reused while tokenizer and text are unchanged."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    token_files = {}
    for split, text_path in text_files.items():
        token_path = folder / f"{split}.bin"
        stamp = {"text_sha256": file_sha256(text_path), "tokenizer_sha256": file_sha256(tokenizer_path)}
        stamp_path = folder / f"{split}.stamp.json"
        if not stage_is_current(stamp_path, stamp, [token_path]):
            stamp_path.unlink(missing_ok=True)
            text = Path(text_path).read_text(encoding="utf-8")
            write_token_file(token_path, encode_text(processor, text), vocab_size)
            stamp_path.write_text(json.dumps(stamp))
        token_files[split] = token_path
    return token_files


def prepare(dataset: str, vocab_size: int, data_root: Path, text_file: str | None = None, log=print) -> PreparedData:
    """Run (or reuse) every stage and return where the tokenizer and token files are."""
    if vocab_size < 300:
        raise PrepareError(f"--vocab-size must be at least 300 (256 byte tokens + specials), got {vocab_size}")
    corpus, text_files = corpus_text_files(dataset, text_file, Path(data_root))
    folder = Path(data_root) / f"{corpus}-bpe{vocab_size}"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"tokenizer: {folder / 'tokenizer.model'}")
    tokenizer_path = train_tokenizer(text_files["train"], folder / "tokenizer", vocab_size)
    log(f"token files: {folder}/{{train,valid,test}}.bin")
    token_files = pretokenize(text_files, tokenizer_path, folder, vocab_size)
    return PreparedData(folder, tokenizer_path, token_files, text_files, vocab_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["tokenizer", "pretokenize"], help="which stage to run (or reuse)")
    parser.add_argument("--dataset", default="wikitext-2", help="wikitext-2 or tinystories")
    parser.add_argument("--text-file", default=None, help="train on your own UTF-8 text file instead")
    parser.add_argument("--vocab-size", type=int, default=4096, help="number of BPE tokens")
    parser.add_argument("--data-dir", default="runs/llm/data", help="where tokenizers and token files are kept")
    args = parser.parse_args()
    try:
        if args.vocab_size < 300:
            raise PrepareError(f"--vocab-size must be at least 300, got {args.vocab_size}")
        corpus, text_files = corpus_text_files(args.dataset, args.text_file, Path(args.data_dir))
        folder = Path(args.data_dir) / f"{corpus}-bpe{args.vocab_size}"
        tokenizer_path = train_tokenizer(text_files["train"], folder / "tokenizer", args.vocab_size)
        show_tokenizer(tokenizer_path)
        if args.stage == "pretokenize":
            token_files = pretokenize(text_files, tokenizer_path, folder, args.vocab_size)
            for split, path in token_files.items():
                tokens = read_token_file(path)
                size = Path(text_files[split]).stat().st_size
                print(f"{split}: {len(tokens):,} tokens ({tokens.dtype}), {size / max(1, len(tokens)):.2f} bytes/token")
    except PrepareError as error:
        sys.exit(f"error: {error}")


def show_tokenizer(tokenizer_path: Path):
    """Print what the tokenizer learned: specials, byte tokens, some merges and an example."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    size = processor.get_piece_size()
    print(f"{tokenizer_path}: {size} tokens")
    print("specials and first bytes:", [processor.id_to_piece(i) for i in range(6)])
    print("first merges:", [processor.id_to_piece(i) for i in range(259, 275)])
    print("last merges:", [processor.id_to_piece(i) for i in range(size - 8, size)])
    example = "The 1984 Olympic Games were held in Los Angeles. 東京"
    print(f"{example!r} ->", processor.encode(example, out_type=str))


if __name__ == "__main__":
    main()
