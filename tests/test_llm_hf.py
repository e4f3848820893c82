"""Tests of the llm chapter's bridge to Hugging Face: real Llama checkpoints in our model, ours out to transformers,
and any text dataset through `datasets`. Every model is a tiny random one built here: no test needs the network."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_llm_in_process as train_in_process

from data import fetch
from llm.checkpoint import load_model
from llm.generate import generate
from llm.hf import (
    CheckpointError,
    halves_to_neighbour_pairs,
    load_hf_folder,
    load_meta_checkpoint,
    neighbour_pairs_to_halves,
)
from llm.model import Llama, LlamaConfig
from llm.prepare import HFSource, PrepareError, open_hf_dataset, prepare, read_token_file

torch.set_num_threads(1)
TINY_TRAINING = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--context-length", "32",
                 "--batch-size", "4", "--vocab-size", "400", "--num-samples", "0", "--lr", "3e-3",
                 "--warmup-steps", "2", "--eval-batches", "2", "--max-steps", "4", "--eval-every", "2",
                 "--dtype", "float32"]
# Three shapes of the Llama family: grouped-query 4/2 with a tied head; 4/1 with an untied head, base 500,000,
# Llama 3 rope scaling and a vocabulary past uint16 (saved in shards); plain multi-head with linear rope scaling.
HF_CONFIGS = {
    "gqa-4-2-tied": dict(vocab_size=500, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "gqa-4-1-untied-llama3-vocab70000-sharded": dict(
        vocab_size=70_000, num_key_value_heads=1, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "mha-4-4-linear-rope": dict(vocab_size=300, num_key_value_heads=4, tie_word_embeddings=False,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def save_tiny_hf_llama(folder: Path, sharded: bool = False, **overrides):
    """A random transformers.LlamaForCausalLM (weights of spread 0.2, so greedy text is not one repeated token)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    settings = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, initializer_range=0.2)
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(HFLlamaConfig(**settings)).eval()
    model.generation_config.eos_token_id = None  # generate all 20 tokens, as ours does without an eos id
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder, max_shard_size="300KB" if sharded else "5GB")
    return model


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_imported_hf_llama_gives_transformers_logits_and_greedy_tokens(tmp_path, name):
    settings = dict(HF_CONFIGS[name])
    reference = save_tiny_hf_llama(tmp_path, sharded="sharded" in name, **settings)
    if "sharded" in name:
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_hf_folder(tmp_path)
    assert ours.config.tie_embeddings == settings["tie_word_embeddings"]
    assert ours.config.n_kv_heads == settings["num_key_value_heads"]
    tokens = torch.randint(0, settings["vocab_size"], (2, 48))
    with torch.no_grad():
        expected = reference(tokens).logits
        logits, _ = ours(tokens)
    torch.testing.assert_close(logits, expected, atol=5e-5, rtol=1e-5)
    prompt = tokens[0, :8].tolist()
    hf_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 8:].tolist()
    our_tokens = generate(ours, prompt, 20, temperature=0)  # our KV cache, one position per step
    assert our_tokens == hf_tokens and len(set(our_tokens)) > 3
    if "rope_scaling" in settings:  # the scaling matters: without it the logits are not the reference's
        plain = Llama(LlamaConfig(**{**ours.config.to_dict(), "rope_scaling": "none", "rope_scale": 1.0}))
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plain.eval()(tokens)[0], expected, atol=1e-3)


def test_unsupported_checkpoints_are_refused_with_one_line(tmp_path):
    save_tiny_hf_llama(tmp_path, vocab_size=100, tie_word_embeddings=True)
    original = json.loads((tmp_path / "config.json").read_text())
    refusals = {
        "attention_bias": ({"attention_bias": True}, "biases"),
        "model_type": ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        "rope": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling 'yarn'"),
    }
    for change, message in refusals.values():
        (tmp_path / "config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(CheckpointError, match=message) as refused:
            load_hf_folder(tmp_path)
        assert "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_folder(tmp_path / "missing")


def rotate_neighbours(x, cos, sin):
    """RoPE as Meta's original code and llama2.c apply it: pairs (x_2i, x_2i+1)."""
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]  # each (B, heads, T, head_dim/2)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (B, heads, T, head_dim/2, 2)
    return rotated.flatten(-2).type_as(x)


def test_neighbour_paired_checkpoint_gives_the_same_logits_after_the_permutation(tmp_path, monkeypatch):
    config = LlamaConfig(vocab_size=120, context_length=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                         tie_embeddings=False)
    model = Llama(config).eval()
    tokens = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        expected, _ = model(tokens)
    # the same model written in Meta's layout: its own names, query/key rows in neighbour-pair order
    state, meta = model.state_dict(), {}
    meta["tok_embeddings.weight"], meta["norm.weight"] = state["embedding.weight"], state["final_norm.weight"]
    meta["output.weight"] = state["output_proj.weight"]
    for n in range(2):
        query, key, value = state[f"blocks.{n}.attention.qkv_proj.weight"].split([64, 32, 32])
        gate, up = state[f"blocks.{n}.ffn.gate_up_proj.weight"].chunk(2)
        meta.update({
            f"layers.{n}.attention.wq.weight": halves_to_neighbour_pairs(query, 4),
            f"layers.{n}.attention.wk.weight": halves_to_neighbour_pairs(key, 2),
            f"layers.{n}.attention.wv.weight": value, f"layers.{n}.attention.wo.weight":
                state[f"blocks.{n}.attention.out_proj.weight"],
            f"layers.{n}.feed_forward.w1.weight": gate, f"layers.{n}.feed_forward.w3.weight": up,
            f"layers.{n}.feed_forward.w2.weight": state[f"blocks.{n}.ffn.down_proj.weight"],
            f"layers.{n}.attention_norm.weight": state[f"blocks.{n}.attention_norm.weight"],
            f"layers.{n}.ffn_norm.weight": state[f"blocks.{n}.ffn_norm.weight"],
        })
    torch.save({name: tensor.clone() for name, tensor in meta.items()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                      "norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 120}))
    converted = load_meta_checkpoint(tmp_path, context_length=64)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens)[0], expected, atol=1e-5, rtol=1e-5)
        # the Meta rows unpermuted are the same model only under neighbour-pair rotation ...
        unpermuted = Llama(converted.config).eval()
        unpermuted.load_state_dict({**converted.state_dict(), **{
            f"blocks.{n}.attention.qkv_proj.weight": torch.cat([meta[f"layers.{n}.attention.wq.weight"],
                                                                 meta[f"layers.{n}.attention.wk.weight"],
                                                                 meta[f"layers.{n}.attention.wv.weight"]])
            for n in range(2)}})
        assert not torch.allclose(unpermuted(tokens)[0], expected, atol=1e-3)  # ... not under ours
        monkeypatch.setattr("llm.model.apply_rope", rotate_neighbours)
        torch.testing.assert_close(unpermuted(tokens)[0], expected, atol=1e-5, rtol=1e-5)
    query = torch.randn(4 * 16, 8)
    assert torch.equal(neighbour_pairs_to_halves(halves_to_neighbour_pairs(query, 4), 4), query)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A model trained a few steps by our trainer on real WikiText-2 text."""
    folder = tmp_path_factory.mktemp("hf-trained")
    text_file = folder / "wiki.txt"
    text_file.write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    train_in_process(*TINY_TRAINING, "--text-file", str(text_file), "--data-dir", str(folder / "data"),
                     "--out-dir", str(folder / "run"), "--no-final-eval")
    return {"checkpoint": folder / "run" / "best.pt", "root": folder}


def test_exported_model_loads_in_transformers_with_our_logits_tokens_and_weights(trained, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm import export

    out = trained["root"] / "hf"
    monkeypatch.setattr("sys.argv", ["export.py", "--checkpoint", str(trained["checkpoint"]), "--out", str(out)])
    export.main()
    assert "wrote" in capsys.readouterr().out
    ours, checkpoint = load_model(str(trained["checkpoint"]), "cpu")
    ours.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, ours(tokens)[0], atol=5e-5, rtol=1e-5)
    prompt = tokens[0, :6].tolist()
    hf_tokens = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert generate(ours, prompt, 12, temperature=0) == hf_tokens
    # the tokenizer: transformers' tokenizer.json gives our SentencePiece ids, line by line of WikiText-2 test
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=checkpoint["tokenizer_path"])
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    lines = (fetch("wikitext-2") / "test.raw").read_text(encoding="utf-8").splitlines()[:400]
    lines += ["naïve café — Ω 東京", "  two  spaces, a tab\tand\na newline ", "1984"]
    for line in lines:
        ids = processor.encode(line)
        assert hf_tokenizer.encode(line, add_special_tokens=False) == ids, line
        assert hf_tokenizer.decode(ids) == processor.decode(ids)
    assert hf_tokenizer.eos_token_id == processor.eos_id()
    # a folder with only the SentencePiece tokenizer.model (Llama 2 style) is read with sentencepiece
    from llm.hf import HFTokenizer

    only_sentencepiece = trained["root"] / "sentencepiece-only"
    only_sentencepiece.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (only_sentencepiece / name).write_bytes((out / name).read_bytes())
    tokenizer = HFTokenizer(only_sentencepiece)
    assert tokenizer.encode(lines[0]) == processor.encode(lines[0]) and tokenizer.eos_id() == processor.eos_id()
    # and back: importing the folder gives bit-identical weights
    imported = load_hf_folder(out)
    original = ours.state_dict()
    assert imported.state_dict().keys() == original.keys()
    assert all(torch.equal(imported.state_dict()[name], original[name]) for name in original)
    # a second export to the same folder is refused
    with pytest.raises(SystemExit, match="already exists"):
        export.main()


@pytest.mark.slow
def test_generate_and_eval_run_an_hf_folder_and_a_hub_name_offline_fails_in_one_line(trained, run_cli, monkeypatch,
                                                                                       capsys):
    from llm import eval as evaluation
    from llm import generate as generation

    folder = trained["root"] / "hf-for-cli"
    from llm.hf import export_hf

    model, checkpoint = load_model(str(trained["checkpoint"]), "cpu")
    export_hf(model, checkpoint["tokenizer_path"], folder)
    monkeypatch.setattr("sys.argv", ["generate.py", "--hf", str(folder), "--prompt", "The game", "--temperature", "0",
                                     "--max-new-tokens", "10"])
    generation.main()
    printed = capsys.readouterr()
    assert printed.out.startswith("--- sample 1 ---\nThe game") and len(printed.out.splitlines()[1]) > len("The game")
    # eval --hf scores WikiText-2 test (its first 30,000 characters here, to keep the test fast)
    short = trained["root"] / "wikitext-2-short"
    short.mkdir(exist_ok=True)
    test_text = (fetch("wikitext-2") / "test.raw").read_text(encoding="utf-8")[:30_000]
    (short / "test.raw").write_text(test_text, encoding="utf-8")
    monkeypatch.setattr("data.fetch", lambda name: short)
    monkeypatch.setattr("sys.argv", ["eval.py", "--hf", str(folder), "--json"])
    evaluation.main()
    output = json.loads(capsys.readouterr().out)
    scored = output["test"]
    # every token of the text, as the checkpoint's own SentencePiece model encodes it, was scored
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=checkpoint["tokenizer_path"])
    assert scored["tokens"] == len(processor.encode(test_text)) - 1 and output["context_length"] == 32
    assert 2.0 < scored["bits_per_byte"] < 8.0
    # a hub name with the hub unreachable: one line that says so and how to pass a folder
    result = run_cli("llm/generate.py", "--hf", "someone/tiny-llama", "--prompt", "Hello",
                     env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(trained["root"] / "hub-cache"),
                          "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hub is unreachable" in lines[0] and "--hf DIR" in lines[0], result.stderr


def write_documents(path: Path, count: int, column: str = "text"):
    paragraphs = [line for line in (fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8").splitlines()
                  if len(line) > 40]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({column: paragraphs[index % len(paragraphs)], "index": index}) + "\n")


def test_hf_dataset_json_lines_and_save_to_disk_train_and_their_stages_are_reused(tmp_path):
    import datasets

    write_documents(tmp_path / "docs.jsonl", 300)
    common = [*TINY_TRAINING, "--data-dir", str(tmp_path / "data"), "--no-final-eval"]
    train_in_process(*common, "--hf-dataset", str(tmp_path / "docs.jsonl"), "--out-dir", str(tmp_path / "json-run"))
    assert (tmp_path / "json-run" / "last.pt").is_file()
    folder = next((tmp_path / "data").glob("hf-docs.jsonl-*-bpe400"))
    written = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.bin")}
    assert len(written) == 3
    train_in_process(*common, "--hf-dataset", str(tmp_path / "docs.jsonl"), "--out-dir", str(tmp_path / "json-2"))
    # same dataset, same fingerprint: the token files are reused, not written again
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.bin")} == written
    train_tokens = read_token_file(folder / "train.bin")
    assert int((np.asarray(train_tokens) == 1).sum()) == 270  # 300 rows, 5% + 5% held out, each ending with EOS
    # a save_to_disk folder whose text sits in another column, with train and validation splits
    rows = datasets.load_dataset("json", data_files=str(tmp_path / "docs.jsonl"),
                                 cache_dir=str(tmp_path / "cache"))["train"].rename_column("text", "body")
    datasets.DatasetDict({"train": rows.select(range(250)), "validation": rows.select(range(250, 300))}).save_to_disk(
        str(tmp_path / "saved"))
    train_in_process(*common, "--hf-dataset", str(tmp_path / "saved"), "--text-column", "body",
                     "--out-dir", str(tmp_path / "disk-run"))
    checkpoint = torch.load(tmp_path / "disk-run" / "last.pt", weights_only=True)
    assert checkpoint["args"]["hf_dataset"] == str(tmp_path / "saved")
    from llm.eval import checkpoint_texts, evaluate  # finds the checkpoint's data again through its saved arguments

    model, texts, _ = checkpoint_texts(str(tmp_path / "disk-run" / "last.pt"), "cpu", ("valid",), None)
    results = evaluate(model, texts, "cpu", "disk-run")
    assert results["valid"]["tokens"] > 1000


def test_tinystories_comes_through_datasets_with_stories_ending_in_eos(tmp_path, monkeypatch):
    import datasets

    stories = ["Once upon a time there was a little cat. The cat liked to play in the sun.",
               "Tom had a red ball. He threw the ball to his dog, and the dog ran after it.",
               "One day, Lily found a big box. Inside the box was a small, happy bird."]
    fixture = datasets.DatasetDict({  # the hub dataset's layout: train and validation splits, a text column
        "train": datasets.Dataset.from_dict({"text": [stories[i % 3] for i in range(120)]}),
        "validation": datasets.Dataset.from_dict({"text": stories * 4}),
    })
    opened = []

    def load_dataset(name, *arguments, **keywords):
        opened.append(name)
        return fixture

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    train_in_process(*TINY_TRAINING, "--dataset", "tinystories", "--data-dir", str(tmp_path / "data"),
                     "--out-dir", str(tmp_path / "run"), "--context-length", "16", "--no-final-eval")
    assert opened == ["roneneldan/TinyStories"] and (tmp_path / "run" / "last.pt").is_file()
    folder = next((tmp_path / "data").glob("hf-roneneldan-TinyStories-*-bpe400"))
    assert int((read_token_file(folder / "train.bin") == 1).sum()) == 120  # every story ends with EOS (id 1)
    assert read_token_file(folder / "test.bin").tolist() == read_token_file(folder / "valid.bin").tolist()


def test_token_files_of_a_dataset_are_streamed_in_chunks_that_do_not_grow_with_it(tmp_path, monkeypatch):
    from llm import prepare as preparation

    chunks = []
    original_write = preparation.TokenFileWriter.write

    def recording_write(self, token_ids):
        chunks.append(len(token_ids))
        original_write(self, token_ids)

    monkeypatch.setattr(preparation.TokenFileWriter, "write", recording_write)
    monkeypatch.setattr(preparation, "TOKEN_WRITE_ROWS", 100)
    (tmp_path / "sample.txt").write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:50_000])
    tokenizer = preparation.train_tokenizer(tmp_path / "sample.txt", tmp_path / "tokenizer", 400)
    largest = {}
    for rows in (1_000, 4_000):
        write_documents(tmp_path / f"docs{rows}.jsonl", rows)
        source = HFSource(str(tmp_path / f"docs{rows}.jsonl"))
        train = open_hf_dataset(source, tmp_path / "data")["train"]
        chunks.clear()
        corpus = preparation.Corpus(f"docs{rows}", {}, {"train": train._fingerprint}, {"train": train}.__getitem__,
                                    document_end=preparation.STORY_SEPARATOR)  # the training split alone
        preparation.pretokenize(corpus, tokenizer, tmp_path / f"out{rows}", 400)
        tokens = read_token_file(tmp_path / f"out{rows}" / "train.bin")
        assert len(chunks) == -(-len(train) // 100) and sum(chunks) == len(tokens)  # one chunk per 100 documents
        largest[rows] = max(chunks)
    # four times the documents, the same size of chunk: the memory of writing does not grow with the corpus
    assert largest[4_000] < 1.5 * largest[1_000]
    # and the streamed file holds exactly the documents' ids, each followed by end-of-sequence
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    first_rows = [json.loads(line)["text"] for line in (tmp_path / "docs1000.jsonl").read_text().splitlines()[:3]]
    expected = [i for text in first_rows for i in [*processor.encode(text), processor.eos_id()]]
    assert read_token_file(tmp_path / "out1000" / "train.bin")[: len(expected)].tolist() == expected


def test_bad_hf_datasets_end_with_one_clear_line(tmp_path, monkeypatch):
    import datasets

    write_documents(tmp_path / "docs.jsonl", 40)
    with pytest.raises(PrepareError, match="no column 'content'.*--text-column") as refused:
        open_hf_dataset(HFSource(str(tmp_path / "docs.jsonl"), text_column="content"), tmp_path / "data")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PrepareError, match="empty.jsonl is empty"):
        open_hf_dataset(HFSource(str(tmp_path / "empty.jsonl")), tmp_path / "data")
    datasets.Dataset.from_dict({"text": ["", " ", "\n"] * 10}).save_to_disk(str(tmp_path / "blank"))
    with pytest.raises(PrepareError, match="hold no text in column 'text'"):
        prepare("unused", 400, tmp_path / "data", hf=HFSource(str(tmp_path / "blank")), log=lambda *a: None)
    with pytest.raises(PrepareError, match="no split 'nope'"):
        open_hf_dataset(HFSource(str(tmp_path / "docs.jsonl"), split="train=nope"), tmp_path / "data")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does, or no network
    with pytest.raises(PrepareError, match="cannot open dataset 'someone/no-such-dataset'.*needs the network"):
        open_hf_dataset(HFSource("someone/no-such-dataset"), tmp_path / "data")
    assert "\n" not in str(refused.value)
