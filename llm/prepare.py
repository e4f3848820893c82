"""The data pipeline, one stage at a time: corpus -> BPE tokenizer -> memory-mapped token files.

    python llm/prepare.py tokenizer   --vocab-size 4096     # train (or reuse) the SentencePiece BPE model
    python llm/prepare.py pretokenize --vocab-size 4096     # encode train/valid/test into .bin token files
    python llm/prepare.py pretokenize --hf-dataset roneneldan/TinyStories   # any dataset `datasets` can open

One pipeline for every corpus: WikiText-2, a text file of your own and a dataset opened through `datasets` differ
only in where the text comes from (open_corpus). Each stage writes a small stamp (JSON) of its inputs beside its
output; when a later call finds the same stamp, the stage is reused instead of recomputed.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
TOKEN_MAGIC = b"HCLTOKv1"  # 8 bytes, then the item size (int64): 2 for uint16, 4 for uint32
HEADER_BYTES = 16
STORY_SEPARATOR = "<|endoftext|>"
TINYSTORIES = "roneneldan/TinyStories"  # --dataset tinystories is this Hugging Face dataset
# A dataset's own split names for ours, in order of preference
HF_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
                  ".csv": "csv"}
TOKENIZER_SAMPLE_BYTES = 200_000_000  # the tokenizer learns from at most this much of a dataset's training text
TOKEN_WRITE_ROWS = 10_000  # documents per chunk written into a token file


class PrepareError(Exception):
    """A problem the user can fix (bad text file, unreachable corpus); printed as one line."""


@dataclass
class HFSource:
    """A text dataset opened through `datasets`: a hub name, local json/jsonl/txt/parquet/csv files or a folder of
    them, or a folder written by save_to_disk. `split` picks the splits (see hf_splits); `text_column` the text."""

    name: str
    config: str | None = None
    split: str | None = None
    text_column: str = "text"


@dataclass
class PreparedData:
    folder: Path
    tokenizer_path: Path
    token_files: dict  # split -> Path of its .bin file
    text_files: dict  # split -> Path of its raw text (for bytes and words of bits-per-byte / word perplexity)
    vocab_size: int


@dataclass
class Corpus:
    """A corpus, wherever its text comes from (see open_corpus).

    The raw text of each split lies on disk (the tokenizer learns from the training text; bits per byte and word
    perplexity divide by the bytes and words of the others), and each split is also a `datasets.Dataset` of
    documents, which the last stage encodes into a token file.
    """

    name: str  # the data folder's name: it changes with anything that changes the text
    text_files: dict  # split -> Path of its raw text
    fingerprints: dict  # split -> what identifies its documents (a token file is reused while it is unchanged)
    documents: Callable  # split -> datasets.Dataset whose text_column holds the documents (opened when needed)
    text_column: str = "text"
    # appended to every document: STORY_SEPARATOR (end-of-sequence) where each row is a whole document, nothing
    # where the text marks its own documents (a text file holds one long text, stories separated by STORY_SEPARATOR)
    document_end: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids up to 65,535; a larger vocabulary needs uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class TokenFileWriter:
    """Write a token file chunk by chunk: the header, then each chunk of ids as it comes, then an atomic rename.

    Memory holds one chunk at a time, so a corpus of any size is written in flat memory.
    """

    def __init__(self, path: Path, vocab_size: int):
        self.path, self.vocab_size, self.dtype = Path(path), vocab_size, token_dtype(vocab_size)
        self.temporary = Path(str(path) + ".tmp")
        self.handle = open(self.temporary, "wb")
        self.handle.write(TOKEN_MAGIC + np.int64(self.dtype.itemsize).tobytes())
        self.count = 0

    def write(self, token_ids) -> None:
        array = np.asarray(token_ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        self.handle.write(array.astype(self.dtype).tobytes())
        self.count += array.size

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        self.handle.close()
        if error_type is None:
            os.replace(self.temporary, self.path)
        else:
            self.temporary.unlink(missing_ok=True)


def write_token_file(path: Path, token_ids, vocab_size: int) -> None:
    """Write ids as a header + flat array of uint16/uint32, atomically (temp file then rename)."""
    with TokenFileWriter(path, vocab_size) as writer:
        writer.write(token_ids)


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
        data = part.encode("utf-8")
        if not paths[split].is_file() or paths[split].read_bytes() != data:  # never rewrite a file others may read
            temporary = Path(str(paths[split]) + ".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, paths[split])
    return paths


def text_corpus(dataset: str, text_file: str | None, data_root: Path) -> Corpus:
    """WikiText-2 (through the data helper) or a user's --text-file (split 90/5/5 by lines): one long text a split."""
    if text_file:
        if not Path(text_file).is_file():
            raise PrepareError(f"text file {text_file} does not exist")
        name = "text-" + file_sha256(Path(text_file))[:12]
        text_files = split_text_file(Path(text_file), data_root / name / "text")
    elif dataset == "wikitext-2":
        from data import DataError, fetch

        try:
            folder = fetch("wikitext-2")
        except DataError as error:
            raise PrepareError(str(error)) from None
        name, text_files = dataset, {split: folder / f"{split}.raw" for split in SPLITS}
    else:
        raise PrepareError(f"unknown dataset {dataset!r} (choose wikitext-2 or tinystories, or give --text-file "
                           "or --hf-dataset)")
    fingerprints = {split: "sha256:" + file_sha256(path) for split, path in text_files.items()}
    return Corpus(name, text_files, fingerprints, documents=lambda split: one_document(text_files[split]))


def one_document(text_path: Path):
    """A split's whole text as a dataset of one row."""
    import datasets

    return datasets.Dataset.from_dict({"text": [Path(text_path).read_text(encoding="utf-8")]})


def stage_is_current(stamp_path: Path, stamp: dict, outputs) -> bool:
    """A stage is reused when its outputs exist, its recorded inputs equal the current ones, and each output
    still has the size and sha256 recorded when it was written (a truncated or damaged file is made again)."""
    if not stamp_path.exists() or not all(Path(output).exists() for output in outputs):
        return False
    try:
        recorded = json.loads(stamp_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(recorded, dict):
        return False
    written = recorded.pop("outputs", {})
    for output in outputs:
        expected = written.get(Path(output).name)
        if expected is not None and expected != output_record(Path(output), expected["bytes"]):
            return False
    return recorded == stamp


def output_record(path: Path, expected_bytes: int | None = None) -> dict:
    """Size and sha256 of a stage's output (the hash is skipped when the size already differs)."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": file_sha256(path) if expected_bytes in (None, size) else None}


def write_stamp(stamp_path: Path, stamp: dict, outputs) -> None:
    """Record a finished stage: its inputs, and the size and sha256 of each output it wrote."""
    record = {**stamp, "outputs": {Path(output).name: output_record(Path(output)) for output in outputs}}
    stamp_path.write_text(json.dumps(record))


# ------------------------------------------------------------------------------ any text dataset via `datasets`


def open_hf_dataset(source: HFSource, data_root: Path) -> dict:
    """Open the dataset and return our split name -> datasets.Dataset (see hf_splits for the choice of splits)."""
    import datasets

    path = Path(source.name).expanduser()
    cache_dir = str(Path(data_root) / "hf-cache")  # Arrow copies of local files stay beside our other data
    try:
        if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            opened = datasets.load_from_disk(str(path))  # a folder written by Dataset(Dict).save_to_disk
        elif path.is_file():
            builder = LOCAL_BUILDERS.get("".join(path.suffixes[-1:]).lower())
            if builder is None:
                raise PrepareError(f"{path}: unknown file type (use {', '.join(sorted(LOCAL_BUILDERS))})")
            if path.stat().st_size == 0:
                raise PrepareError(f"{path} is empty")
            opened = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        elif path.is_dir():
            opened = datasets.load_dataset(str(path), cache_dir=cache_dir)  # a folder of data files
        else:
            opened = datasets.load_dataset(source.name, source.config)  # a hub name: the usual Hugging Face cache
    except PrepareError:
        raise
    except Exception as error:  # noqa: BLE001 - unreachable hub, unknown name, unreadable files: one line each
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        hint = "" if path.exists() else ("; a hub name needs the network: download the dataset elsewhere, or pass "
                                         "local json/jsonl/txt/parquet files or a save_to_disk folder")
        raise PrepareError(f"cannot open dataset {source.name!r} ({type(error).__name__}: {reason}){hint}") from None
    if isinstance(opened, datasets.Dataset):
        opened = {"train": opened}
    return hf_splits(dict(opened), source)


def hf_splits(available: dict, source: HFSource) -> dict:
    """train/valid/test from the dataset's splits.

    --hf-split train=train,valid=validation,test=test names them; --hf-split NAME uses that one split alone.
    By default: the dataset's train, validation and test splits; without a test split the validation split
    doubles as test; with neither, the last 10% of the training rows become validation and test (5% each).
    """
    spec = source.split
    chosen = {}
    if spec and "=" in spec:
        for part in spec.split(","):
            ours, _, theirs = part.partition("=")
            if ours.strip() not in SPLITS:
                raise PrepareError(f"--hf-split: {ours.strip()!r} is not one of {', '.join(SPLITS)}")
            chosen[ours.strip()] = theirs.strip()
    elif spec:
        chosen["train"] = spec
    else:
        for ours, names in HF_SPLIT_NAMES.items():
            found = [name for name in names if name in available]
            if found:
                chosen[ours] = found[0]
    for theirs in chosen.values():
        if theirs not in available:
            raise PrepareError(f"{source.name}: no split {theirs!r} (it has {', '.join(sorted(available))})")
    if "train" not in chosen:
        raise PrepareError(f"{source.name}: no training split (it has {', '.join(sorted(available))}); "
                           "name one with --hf-split")
    splits = {ours: available[theirs] for ours, theirs in chosen.items()}
    for ours, split in splits.items():
        if source.text_column not in split.column_names:
            raise PrepareError(f"{source.name}: no column {source.text_column!r} (columns: "
                               f"{', '.join(split.column_names)}); choose one with --text-column")
        if len(split) == 0:
            raise PrepareError(f"{source.name}: the {chosen[ours]!r} split is empty")
    if "valid" not in splits and "test" in splits:
        splits["valid"] = splits["test"]
    if "valid" not in splits:
        train = splits["train"]
        held_out = max(1, len(train) // 20)
        if len(train) < 3 * held_out or len(train) < 3:
            raise PrepareError(f"{source.name}: {len(train)} rows are too few to hold out validation and test rows")
        splits["train"] = train.select(range(len(train) - 2 * held_out))
        splits["valid"] = train.select(range(len(train) - 2 * held_out, len(train) - held_out))
        splits["test"] = train.select(range(len(train) - held_out, len(train)))
    splits.setdefault("test", splits["valid"])
    return splits


def hf_corpus_name(source: HFSource) -> str:
    """A folder name that says which dataset this is and changes with anything that changes the text."""
    identity = json.dumps([str(Path(source.name).expanduser().resolve()) if Path(source.name).expanduser().exists()
                           else source.name, source.config, source.split, source.text_column])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.name).name if Path(source.name).exists() else source.name)
    return f"hf-{readable.strip('-')[:40]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def write_split_texts(splits: dict, source: HFSource, folder: Path) -> dict:
    """The raw text of each split on disk, one row after another, for the byte and word counts of bits per byte
    and word perplexity (training split: the first TOKENIZER_SAMPLE_BYTES, what the tokenizer learns from).

    Rows are written as they are read, so memory stays flat. Reused while the dataset's fingerprints are unchanged.
    """
    stamp = {"source": vars(source), "fingerprints": {split: dataset._fingerprint for split, dataset in splits.items()}}
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    stamp_path = folder / "text.stamp.json"
    if stage_is_current(stamp_path, stamp, paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    for split, path in paths.items():
        limit = TOKENIZER_SAMPLE_BYTES if split == "train" else None
        written, has_text = 0, False
        temporary = Path(str(path) + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for batch in splits[split].select_columns([source.text_column]).iter(batch_size=1000):
                for row in batch[source.text_column]:
                    if not isinstance(row, str | None):
                        raise PrepareError(f"{source.name}: column {source.text_column!r} holds "
                                           f"{type(row).__name__}, not text; choose another with --text-column")
                    row = (row or "").replace(STORY_SEPARATOR, "")
                    handle.write(row + "\n")
                    written += len(row) + 1
                    has_text = has_text or bool(row.strip())
                if limit is not None and written >= limit:
                    break
        if not has_text:
            temporary.unlink()
            raise PrepareError(f"{source.name}: the {split} rows hold no text in column {source.text_column!r}")
        os.replace(temporary, path)
    stamp_path.write_text(json.dumps(stamp))
    return paths


def dataset_corpus(source: HFSource, data_root: Path, log=print) -> Corpus:
    """Any text dataset `datasets` opens (--hf-dataset, --dataset tinystories): each row is one document."""
    log(f"dataset: {source.name} (through datasets)")
    name = hf_corpus_name(source)
    splits = open_hf_dataset(source, data_root)
    text_files = write_split_texts(splits, source, data_root / name / "text")
    fingerprints = {split: dataset._fingerprint for split, dataset in splits.items()}
    return Corpus(name, text_files, fingerprints, documents=splits.__getitem__, text_column=source.text_column,
                  document_end=STORY_SEPARATOR)


def open_corpus(dataset: str, text_file: str | None, data_root: Path, hf: HFSource | None = None, log=print):
    """Where the text comes from: a --text-file, else a dataset through `datasets` (--hf-dataset, tinystories),
    else WikiText-2."""
    hf = hf or source_from_args(dataset)
    if text_file or hf is None:
        return text_corpus(dataset, text_file, data_root)
    return dataset_corpus(hf, data_root, log)


class DocumentEncoder:
    """The Dataset.map function: each row (a document, with document_end appended) -> its ids.

    It holds only the tokenizer's path, so it pickles into the worker processes of num_proc, where each worker
    loads the tokenizer once.
    """

    def __init__(self, tokenizer_path: str, document_end: str = ""):
        self.tokenizer_path, self.document_end = tokenizer_path, document_end
        self.processor = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "document_end": self.document_end, "processor": None}

    def __call__(self, texts: list) -> dict:
        if self.processor is None:
            import sentencepiece as spm

            self.processor = spm.SentencePieceProcessor(model_file=self.tokenizer_path)
        return {"ids": [encode_text(self.processor, (text or "") + self.document_end).astype(np.int32)
                        for text in texts]}


def map_workers(rows: int) -> int | None:
    """Worker processes for Dataset.map: one per core on large splits, none (this process) on small ones."""
    return min(os.cpu_count() or 1, 8) if rows >= 50_000 else None


def pretokenize(corpus: Corpus, tokenizer_path: Path, folder: Path, vocab_size: int) -> dict:
    """Encode every split into folder/<split>.bin: Dataset.map(batched=True, num_proc=...) writes the ids as Arrow
    files on disk, and TokenFileWriter copies them batch by batch into the token file, so neither step holds the
    corpus in memory. A split is reused while its documents and the tokenizer are unchanged."""
    import datasets

    token_files = {}
    for split in corpus.fingerprints:
        token_path = folder / f"{split}.bin"
        stamp = {"corpus": corpus.name, "documents": corpus.fingerprints[split], "text_column": corpus.text_column,
                 "document_end": corpus.document_end, "tokenizer_sha256": file_sha256(tokenizer_path),
                 "vocab_size": vocab_size}
        stamp_path = folder / f"{split}.stamp.json"
        if not stage_is_current(stamp_path, stamp, [token_path]):
            stamp_path.unlink(missing_ok=True)
            documents = corpus.documents(split)
            mapped = documents.map(DocumentEncoder(str(tokenizer_path), corpus.document_end), batched=True,
                                   input_columns=[corpus.text_column], remove_columns=documents.column_names,
                                   num_proc=map_workers(len(documents)), desc=f"tokenizing {split}",
                                   features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
                                   cache_file_name=str(folder / f"{split}.ids.arrow"), load_from_cache_file=False)
            with TokenFileWriter(token_path, vocab_size) as writer:
                for batch in mapped.with_format("arrow").iter(batch_size=TOKEN_WRITE_ROWS):
                    writer.write(batch.column("ids").combine_chunks().flatten().to_numpy())
            del mapped
            for leftover in folder.glob(f"{split}.ids*.arrow"):
                leftover.unlink()
            write_stamp(stamp_path, stamp, [token_path])
        token_files[split] = token_path
    return token_files


def source_from_args(dataset: str, hf_dataset: str | None = None, hf_config: str | None = None,
                     hf_split: str | None = None, text_column: str = "text") -> HFSource | None:
    """The HFSource that train.py's flags (or a checkpoint's saved args) describe, or None for our own corpora."""
    if hf_dataset:
        return HFSource(hf_dataset, hf_config, hf_split, text_column)
    if dataset == "tinystories":
        return HFSource(TINYSTORIES, hf_config, hf_split, text_column)
    return None


def saved_hf_source(train_args: dict) -> HFSource | None:
    """source_from_args for the training arguments a checkpoint saved (older checkpoints lack the hf_* keys)."""
    return source_from_args(train_args.get("dataset", "wikitext-2"), train_args.get("hf_dataset"),
                            train_args.get("hf_config"), train_args.get("hf_split"),
                            train_args.get("text_column") or "text")


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


def prepare(dataset: str, vocab_size: int, data_root: Path, text_file: str | None = None, log=print,
            hf: HFSource | None = None, stop_after: str = "pretokenize") -> PreparedData:
    """Run (or reuse) every stage and return where the tokenizer and token files are.

    `hf` (or --dataset tinystories) reads the corpus through `datasets`, `text_file` a user's text, and otherwise
    WikiText-2; stop_after="tokenizer" leaves the token files alone.
    """
    if vocab_size < 300:
        raise PrepareError(f"--vocab-size must be at least 300 (256 byte tokens + specials), got {vocab_size}")
    corpus = open_corpus(dataset, text_file, Path(data_root), hf, log)
    folder = Path(data_root) / f"{corpus.name}-bpe{vocab_size}"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"tokenizer: {folder / 'tokenizer.model'}")
    tokenizer_path = train_tokenizer(corpus.text_files["train"], folder / "tokenizer", vocab_size)
    token_files = {}
    if stop_after == "pretokenize":
        log(f"token files: {folder}/{{train,valid,test}}.bin")
        token_files = pretokenize(corpus, tokenizer_path, folder, vocab_size)
    return PreparedData(folder, tokenizer_path, token_files, corpus.text_files, vocab_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["tokenizer", "pretokenize"], help="which stage to run (or reuse)")
    parser.add_argument("--dataset", default="wikitext-2", help=f"wikitext-2 or tinystories ({TINYSTORIES})")
    parser.add_argument("--text-file", default=None, help="train on your own UTF-8 text file instead")
    parser.add_argument("--vocab-size", type=int, default=4096, help="number of BPE tokens (at least 300)")
    parser.add_argument("--data-dir", default="runs/llm/data", help="where tokenizers and token files are kept")
    add_hf_dataset_arguments(parser)
    args = parser.parse_args()
    try:
        hf = source_from_args(args.dataset, args.hf_dataset, args.hf_config, args.hf_split, args.text_column)
        prepared = prepare(args.dataset, args.vocab_size, Path(args.data_dir), args.text_file, hf=hf,
                           stop_after=args.stage)
    except PrepareError as error:
        sys.exit(f"error: {error}")
    show_tokenizer(prepared.tokenizer_path)
    for split, path in prepared.token_files.items():
        tokens = read_token_file(path)
        size = Path(prepared.text_files[split]).stat().st_size
        print(f"{split}: {len(tokens):,} tokens ({tokens.dtype}), {size / max(1, len(tokens)):.2f} bytes/token")


def add_hf_dataset_arguments(parser: argparse.ArgumentParser):
    """The flags that pick a corpus through `datasets` (shared by prepare.py and train.py)."""
    group = parser.add_argument_group("any text dataset through `datasets`")
    group.add_argument("--hf-dataset", default=None, metavar="NAME_OR_PATH",
                       help="a hub name (owner/dataset), local json/jsonl/txt/parquet/csv files or a folder of them, "
                            "or a folder written by save_to_disk")
    group.add_argument("--hf-config", default=None, help="the dataset's configuration (its second load_dataset name)")
    group.add_argument("--hf-split", default=None,
                       help="train=NAME,valid=NAME,test=NAME, or one NAME to split 90/5/5 (default: the dataset's "
                            "train/validation/test)")
    group.add_argument("--text-column", default="text", help="the column that holds the text")


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
