"""GGUF files in the hand-written model (llm/gguf_file.py), chat templates and streaming text (llm/chat_template.py),
and the one loader of chat models (llm/chat_model.py).

Small GGUF files are written here with the gguf package's own writer: a tiny random Llama in every block type,
read by us and by transformers; files that must be refused. The last part runs the real SmolLM2-135M-Instruct file
(from the data mirror) against transformers loading the same file.
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.chat_model import (
    CheckpointTokenizer,
    add_model_arguments,
    chat_model_from_arguments,
    load_chat_model,
    model_from_arguments,
)
from llm.chat_template import ChatTemplateError, IncrementalDecoder, render_chat_template
from llm.gguf_file import GGUFError, load_gguf
from llm.hf import HFTokenizer, hf_tensors_from_ours
from llm.model import Llama, LlamaConfig

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parents[1]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # rows of 256 and 512 values: whole blocks for K-quants
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # float16 fields


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (the space is 'Ġ'), in its order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


TOKENS = SPECIALS + byte_symbols() + [merge.replace(" ", "") for merge in MERGES]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))  # 3 = control, 1 = normal


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py: query/key rows reordered for a RoPE that rotates neighbours."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def gguf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """Our model's weights under GGUF names, in llama.cpp's layout, as float32 arrays."""
    hf = {name: tensor.numpy() for name, tensor in hf_tensors_from_ours(model).items()}
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    renames = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for n in range(model.config.n_layers):
        for hf_name, name in renames.items():
            tensors[f"blk.{n}.{name}.weight"] = hf[f"model.layers.{n}.{hf_name}.weight"]
        tensors[f"blk.{n}.attn_q.weight"] = llama_cpp_permute(tensors[f"blk.{n}.attn_q.weight"], model.config.n_heads)
        tensors[f"blk.{n}.attn_k.weight"] = llama_cpp_permute(tensors[f"blk.{n}.attn_k.weight"],
                                                              model.config.n_kv_heads)
    return tensors


def random_k_blocks(rows: int, columns: int, kind, generator: np.random.Generator) -> np.ndarray:
    """Random bytes of a K-quant tensor, with small finite float16 scales where the block layout keeps them."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = generator.integers(0, 256, size=(rows * columns // block_values, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES[kind]:
        scales = generator.uniform(0.0005, 0.003, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model: Llama, weight_type=Q.F32, architecture="llama", tokenizer_model="gpt2",
               pre="smollm", extra_tensors=None, drop=(), seed=0, chat_template=TEMPLATE) -> Path:
    """A GGUF file as llama.cpp's converter writes one: metadata, tokenizer, chat template, weights in `weight_type`
    (norms stay F32, as in real files). Random bytes stand in for weights in the K-quant types (the gguf package
    reads them but cannot write them)."""
    config, generator = model.config, np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    tensors = {**gguf_tensors(model), **(extra_tensors or {})}
    for name, values in tensors.items():
        if name in drop:
            continue
        if values.ndim == 1 or weight_type == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
        elif weight_type == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif weight_type in K_QUANT_SCALES and name != "token_embd.weight":
            writer.add_tensor(name, random_k_blocks(*values.shape, weight_type, generator), raw_dtype=weight_type)
        elif weight_type in K_QUANT_SCALES:  # a vocabulary of a few hundred rows: embedding in Q8_0, as files do
            writer.add_tensor(name, gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, weight_type), raw_dtype=weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_model() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENS), context_length=64, n_layers=LAYERS, n_heads=HEADS,
                         n_kv_heads=KV_HEADS, d_model=HIDDEN, ffn_hidden=FFN, rope_theta=10000.0,
                         norm_eps=2.0**-16)  # exact in float32, as GGUF stores it
    model = Llama(config).eval()
    with torch.no_grad():  # norm gains other than 1, so that a norm read into the wrong place shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model) -> Path:
    """One tiny GGUF per block type, written once for the module."""
    folder = tmp_path_factory.mktemp("gguf")
    for kind in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANT_SCALES):
        write_gguf(folder / f"tiny-{kind.name}.gguf", tiny_model, kind)
    return folder


def one_line_refusal(call) -> str:
    with pytest.raises(GGUFError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    return message


# ------------------------------------------------------------------------------------------- weights and config


def test_float32_gguf_gives_back_the_exact_weights_and_logits(tiny_model, tiny_folder):
    model, _ = load_gguf(tiny_folder / "tiny-F32.gguf")
    assert model.config.to_dict() == {**tiny_model.config.to_dict()}
    original = tiny_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name  # llama.cpp's query/key row order undone exactly
    tokens = torch.randint(0, len(TOKENS), (2, 24))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], tiny_model(tokens)[0])


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_every_block_type_computes_what_transformers_computes_from_the_same_file(tiny_model, tiny_folder, kind):
    from transformers import AutoModelForCausalLM

    model, _ = load_gguf(tiny_folder / f"tiny-{kind}.gguf")
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, gguf_file=f"tiny-{kind}.gguf",
                                                     dtype=torch.float32).eval()
    tokens = torch.randint(0, len(TOKENS), (2, 24))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], reference(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    if not kind.endswith("_K"):  # the K-quant files hold random blocks; the others quantize the tiny model
        error_bound = {"F16": 2e-3, "BF16": 2e-2, "Q8_0": 5e-2}.get(kind, 0.6)
        with torch.no_grad():
            assert (ours - tiny_model(tokens)[0]).abs().max() < error_bound


def test_k_quant_blocks_dequantize_as_transformers_own_dequantizer_reads_them(tiny_folder):
    from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize

    from llm.gguf_file import dequantized, open_gguf

    for kind in K_QUANT_SCALES:
        reader = open_gguf(tiny_folder / f"tiny-{kind.name}.gguf")
        tensor = next(tensor for tensor in reader.tensors if tensor.name == "blk.0.ffn_down.weight")
        ours = dequantized(tensor, torch.float32, "test")  # (HIDDEN, FFN)
        theirs = transformers_dequantize(torch.from_numpy(np.array(tensor.data)).reshape(-1), int(kind))
        assert ours.shape == (HIDDEN, FFN) and torch.equal(ours.reshape(-1), theirs), kind.name


def test_bfloat16_load_rounds_the_float32_weights(tiny_folder):
    full, _ = load_gguf(tiny_folder / "tiny-Q4_1.gguf")
    half, _ = load_gguf(tiny_folder / "tiny-Q4_1.gguf", dtype=torch.bfloat16)
    for (name, tensor), other in zip(full.state_dict().items(), half.state_dict().values()):
        assert other.dtype == torch.bfloat16 and torch.equal(other, tensor.to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "F32"])
def test_dequantizing_a_few_rows_at_a_time_gives_the_whole_tensors_with_temporaries_of_a_few_rows(tiny_folder,
                                                                                                 monkeypatch, kind):
    """The gguf package's float32 temporaries are numpy arrays, which tracemalloc sees (the model's own tensors are
    torch's, which it does not). Read 5 rows at a time, a whole model loads with less than half of its largest
    tensor's float32 bytes of them (whole tensors at once: several times the largest); and the weights are those
    of whole-tensor dequantization."""
    import tracemalloc

    from gguf.quants import dequantize

    import llm.gguf_file as gguf_file

    reader = gguf_file.open_gguf(tiny_folder / f"tiny-{kind}.gguf")
    config = gguf_file.config_from_gguf(reader, "test")
    largest = max(4 * int(np.prod(tensor.shape)) for tensor in reader.tensors)  # bytes as float32
    monkeypatch.setattr(gguf_file, "DEQUANTIZE_ROWS", 5)
    gguf_file.load_gguf_model(reader, config, "test")  # once before: what it imports on first use is not counted
    tracemalloc.start()
    model = gguf_file.load_gguf_model(reader, config, "test")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < largest / 2, (peak, largest)
    embedding = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
    assert len(embedding.data) % 5 != 0  # a last step of fewer rows
    assert torch.equal(model.embedding.weight, torch.from_numpy(dequantize(embedding.data, embedding.tensor_type)))


# ---------------------------------------------------------------------------------------------------- refusals


def patched_tensor_type(path: Path, tensor_name: str, type_number: int) -> Path:
    """Overwrite the block type of one tensor in the file's tensor table (name, dims, type, offset)."""
    data = bytearray(path.read_bytes())
    name = tensor_name.encode()
    start = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    dimensions = int.from_bytes(data[start : start + 4], "little")
    type_at = start + 4 + 8 * dimensions
    data[type_at : type_at + 4] = type_number.to_bytes(4, "little")
    out = path.with_name(path.stem + f"-type{type_number}.gguf")
    out.write_bytes(bytes(data))
    return out


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", tiny_model, architecture="qwen2")
    assert "architecture 'qwen2' is not supported" in one_line_refusal(lambda: load_gguf(path))


def test_a_block_type_the_gguf_package_cannot_dequantize_is_refused_in_one_line(tiny_folder, tmp_path):
    q8_1 = patched_tensor_type(tiny_folder / "tiny-Q8_0.gguf", "blk.0.attn_v.weight", int(Q.Q8_1))  # same size
    assert "stored as Q8_1" in one_line_refusal(lambda: load_gguf(q8_1))
    unknown = patched_tensor_type(tiny_folder / "tiny-Q8_0.gguf", "blk.0.attn_v.weight", 99)
    assert "not a readable GGUF file" in one_line_refusal(lambda: load_gguf(unknown))


@pytest.mark.parametrize("cut", ["empty", "header", "tensors", "last_byte"])
def test_a_truncated_file_is_refused_in_one_line(tiny_folder, tmp_path, cut):
    data = (tiny_folder / "tiny-Q4_1.gguf").read_bytes()
    keep = {"empty": 0, "header": 200, "tensors": len(data) // 2, "last_byte": len(data) - 1}[cut]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    message = one_line_refusal(lambda: load_gguf(path))
    assert "not a readable GGUF file" in message or "truncated" in message


def test_files_that_are_not_llama_weights_are_refused_in_one_line(tiny_model, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    assert "GGUF magic invalid" in one_line_refusal(lambda: load_gguf(text))
    assert "no such file" in one_line_refusal(lambda: load_gguf(tmp_path / "missing.gguf"))
    bias = {"blk.0.attn_q.bias": np.zeros(HIDDEN, dtype=np.float32)}
    path = write_gguf(tmp_path / "bias.gguf", tiny_model, extra_tensors=bias)
    assert "biases" in one_line_refusal(lambda: load_gguf(path))
    path = write_gguf(tmp_path / "extra.gguf", tiny_model, extra_tensors={"blk.9.ffn_up.weight": np.zeros((2, 2))})
    assert "blk.9.ffn_up.weight is not part of a 2-layer Llama" in one_line_refusal(lambda: load_gguf(path))
    path = write_gguf(tmp_path / "missing-tensor.gguf", tiny_model, drop=("blk.1.ffn_up.weight",))
    assert "blk.1.ffn_up.weight is missing" in one_line_refusal(lambda: load_gguf(path))
    path = write_gguf(tmp_path / "spm.gguf", tiny_model, tokenizer_model="llama")
    assert "tokenizer 'llama' is not supported" in one_line_refusal(lambda: load_gguf(path))
    path = write_gguf(tmp_path / "pre.gguf", tiny_model, pre="no-such-split")
    assert "pre-tokenizer 'no-such-split'" in one_line_refusal(lambda: load_gguf(path))


@pytest.mark.slow
def test_describe_cli_prints_the_model_and_refuses_a_bad_file_in_one_line(tiny_folder, tmp_path, run_cli):
    result = run_cli("llm/gguf_file.py", str(tiny_folder / "tiny-Q4_1.gguf"))
    assert result.returncode == 0, result.stderr
    assert "2 layers" in result.stdout and "Q4_1" in result.stdout and "<|im_start|>assistant" in result.stdout
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(10))
    result = run_cli("llm/gguf_file.py", str(tmp_path / "bad.gguf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ tokenizer and text


def test_tokenizer_from_metadata_keeps_special_tokens_whole_and_leaves_them_out_of_text(tiny_folder):
    _, tokenizer = load_gguf(tiny_folder / "tiny-F32.gguf")
    ids = tokenizer.encode("<|im_start|>user\n the tin<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and TOKENS.index("Ġthe") in ids and TOKENS.index("in") in ids
    assert tokenizer.decode(ids) == "user\n the tin"
    assert tokenizer.eos_id() == 2 and tokenizer.stop_ids == (2,) and tokenizer.vocab_size == len(TOKENS)
    assert tokenizer.chat_template == TEMPLATE


def test_incremental_decoder_holds_a_character_until_its_last_byte_arrives(tiny_folder):
    _, tokenizer = load_gguf(tiny_folder / "tiny-F32.gguf")
    text = "é你😀 the end"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary has single bytes only: every multi-byte character is cut
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token_id) for token_id in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[:2] == ["", "é"]  # two bytes, two tokens: nothing, then the whole character


def test_generate_stream_printer_prints_a_character_cut_across_two_tokens_whole(tiny_folder, capsys):
    from llm.generate import StreamPrinter

    _, tokenizer = load_gguf(tiny_folder / "tiny-F32.gguf")
    prompt_ids = tokenizer.encode("Chinese:")
    printer = StreamPrinter(tokenizer, prompt_ids)
    for token_id in tokenizer.encode(" 你好"):  # 你 and 好 are three bytes each, one token per byte here
        printer(token_id)
    printer.finish()
    assert capsys.readouterr().out == " 你好"


def test_incremental_decoder_keeps_sentencepiece_spaces(tmp_path):
    processor = tiny_sentencepiece(tmp_path)
    text = "the cat sat on the mat"
    decoder = IncrementalDecoder(processor, processor.encode("once"))
    streamed = "".join(decoder.push(i) for i in processor.encode(" " + text)) + decoder.flush()
    assert streamed == " " + text


TEMPLATES = {
    "the file's own": TEMPLATE,
    "with bos and a loop break": "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                                 "[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}",
    "with tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}",
    "whitespace control": "{% for m in messages %}\n  {% if m.role == 'user' %}\n    U: {{ m.content }}\n"
                          "  {% else %}\n    A: {{ m.content }}\n  {% endif %}\n{% endfor %}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_as_transformers_renders_it(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "¿Qué tal? 你好 😀"}, {"role": "assistant", "content": " Bien. "},
                {"role": "user", "content": "And \"quotes\" <b>?"}]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    for add_generation_prompt in (True, False):
        ours = render_chat_template(TEMPLATES[name], messages, add_generation_prompt, **tokens)
        theirs = render_jinja_template([messages], chat_template=TEMPLATES[name],
                                       add_generation_prompt=add_generation_prompt, **tokens)[0][0]
        assert ours == theirs


def test_a_template_that_raises_or_is_missing_is_one_line_error():
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}" \
             "{% endif %}{{ messages[0]['content'] }}"
    assert render_chat_template(strict, [{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ChatTemplateError, match="must start with the user"):
        render_chat_template(strict, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{% for %}", [{"role": "user", "content": "hi"}])


def test_hf_tokenizer_takes_its_chat_template_and_stop_ids_from_the_folder(tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer = load_gguf(tiny_folder / "tiny-F32.gguf")
    tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours, theirs = HFTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "the tin"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    text = ours.apply_chat_template(messages)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.stop_ids == (2, 0) and ours.vocab_size == len(TOKENS) and ours.stop_strings == ()
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert HFTokenizer(tmp_path).apply_chat_template(messages) == "the tin!"


# ------------------------------------------------------------------------------------- one loader, shared flags


def tiny_sentencepiece(folder: Path):
    import sentencepiece as spm

    lines = ["the cat sat on the mat", "a dog ran in the park", "once upon a time there was a cat"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))


def tiny_checkpoint(folder: Path, chat_template: str | None = None) -> Path:
    from llm.runs import save_checkpoint

    processor = tiny_sentencepiece(folder)
    config = LlamaConfig(vocab_size=processor.get_piece_size(), context_length=32, n_layers=1, n_heads=2,
                         n_kv_heads=1, d_model=32)
    tokenizer_path = folder / "sp.model"
    state = {"config": config.to_dict(), "model": Llama(config).state_dict(), "tokenizer_path": str(tokenizer_path),
             "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()}
    if chat_template:
        state["chat_template"] = chat_template
    save_checkpoint(folder / "best.pt", state)
    return folder / "best.pt"


def test_a_checkpoint_without_chat_template_falls_back_to_plain_lines_and_says_so(tmp_path):
    notes = []
    model, tokenizer = load_chat_model(checkpoint=tiny_checkpoint(tmp_path), notice=notes.append)
    assert len(notes) == 1 and "no chat template" in notes[0]
    assert isinstance(tokenizer, CheckpointTokenizer) and model.embedding.weight.dtype == torch.float32
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]
    assert tokenizer.apply_chat_template(messages) == "System: Be brief.\n\nUser: the cat\n\nAssistant:"
    assert tokenizer.stop_ids == (1,) and tokenizer.stop_strings == ("\nUser:",)
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"


def test_a_checkpoint_with_its_own_chat_template_uses_it_silently(tmp_path):
    notes = []
    path = tiny_checkpoint(tmp_path, chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    model, tokenizer = load_chat_model(checkpoint=path, dtype=torch.bfloat16, notice=notes.append)
    assert notes == [] and model.embedding.weight.dtype == torch.bfloat16
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert tokenizer.stop_strings == ()


def test_model_flags_are_shared_and_exclusive(tiny_folder, capsys):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--gguf", str(tiny_folder / "tiny-Q8_0.gguf"), "--dtype", "bfloat16", "--device", "cpu"])
    model, tokenizer = model_from_arguments(args)
    assert model.embedding.weight.dtype == torch.bfloat16 and tokenizer.chat_template == TEMPLATE
    with pytest.raises(SystemExit):
        parser.parse_args(["--gguf", "a.gguf", "--hf", "folder"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most one"):
        load_chat_model(gguf="a.gguf", checkpoint="b.pt")


def test_chat_and_serve_take_a_model_with_a_chat_template_and_refuse_one_without(tiny_model, tiny_folder, tmp_path):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    bare = write_gguf(tmp_path / "bare.gguf", tiny_model, chat_template=None)
    with pytest.raises(ValueError, match="^this model has no chat template$"):
        chat_model_from_arguments(parser.parse_args(["--gguf", str(bare), "--device", "cpu"]))
    model, tokenizer = chat_model_from_arguments(parser.parse_args(["--gguf", str(tiny_folder / "tiny-F32.gguf")]))
    expected, _ = load_gguf(tiny_folder / "tiny-F32.gguf")
    ids = torch.tensor([[3, 5, 7, 11]])
    assert tokenizer.chat_template == TEMPLATE  # and laid out for decoding: the same logits
    torch.testing.assert_close(model(ids)[0], expected(ids)[0], atol=1e-5, rtol=1e-5)


def test_a_model_with_a_gguf_tokenizer_exports_a_folder_transformers_reads(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.export import export_with_gguf_tokenizer

    model, tokenizer = load_gguf(tiny_folder / "tiny-F32.gguf")
    out = export_with_gguf_tokenizer(model, tokenizer, tmp_path / "hf")
    assert sorted(path.name for path in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    theirs = AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\n the tin<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert theirs.chat_template == TEMPLATE and theirs.eos_token == tokenizer.special_tokens["eos_token"]
    ids = torch.tensor([tokenizer.encode(text)])
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(reference(ids).logits, model(ids)[0], atol=1e-4, rtol=1e-4)


def test_no_model_flag_fetches_smollm2_through_the_data_helper(monkeypatch, tmp_path):
    import data

    asked = []
    monkeypatch.setattr(data, "fetch", lambda name: asked.append(name) or tmp_path)
    from llm.chat_model import default_model_path

    assert default_model_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and asked == ["smollm2"]
    monkeypatch.setattr(data, "fetch", lambda name: (_ for _ in ()).throw(data.DataError("nothing reachable")))
    with pytest.raises(ValueError, match="nothing reachable"):
        load_chat_model()


# -------------------------------------------------------------------- the real SmolLM2 file against transformers

SAMPLE_TEXTS = {
    "English": "The quick brown fox jumps over the lazy dog. It's 3:45 pm; don't forget the 2,048 tokens!",
    "Spanish": "¿Dónde está la biblioteca? El niño comió una piña en el año 1999, según él.",
    "Chinese": "你好，世界！今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。",
    "code": "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n-2)"
            "  # O(2^n)\n",
    "emoji": "I love pizza 🍕🍕 and cats 🐈‍⬛! 👍🏽 Flags: 🇫🇷🇯🇵 ✨",
}
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    import os

    from data import fetch

    if "HCL_DATA_MIRROR" not in os.environ:
        pytest.skip("no local data mirror beside this checkout")
    return fetch("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_transformers_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.mark.slow
def test_smollm2_shape_comes_from_its_metadata(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.ffn_hidden) == (
        30, 576, 9, 3, 1536)
    assert (config.vocab_size, config.rope_theta, config.tie_embeddings) == (49152, 100000.0, True)
    assert tokenizer.stop_ids == (2,) and tokenizer.decode([2]) == ""


@pytest.mark.slow
@pytest.mark.parametrize("language", list(SAMPLE_TEXTS))
def test_smollm2_tokenizer_gives_transformers_ids(smollm2, smollm2_transformers_tokenizer, language):
    _, tokenizer = smollm2
    text = SAMPLE_TEXTS[language]
    ids = tokenizer.encode(text)
    assert ids == smollm2_transformers_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_smollm2_chat_template_renders_as_transformers_renders_it(smollm2, smollm2_transformers_tokenizer):
    _, tokenizer = smollm2
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "You speak Spanish."}, {"role": "user", "content": "Hola"},
         {"role": "assistant", "content": "¡Hola! ¿Qué tal?"}, {"role": "user", "content": "Bien 😀"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt)
            theirs = smollm2_transformers_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours == theirs
            assert tokenizer.encode(ours) == smollm2_transformers_tokenizer.encode(ours, add_special_tokens=False)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_on_a_batch_of_long_prompts(smollm2, smollm2_transformers):
    model, tokenizer = smollm2
    reference = smollm2_transformers
    ids = tokenizer.encode((REPO_ROOT / "llm" / "README.md").read_text(encoding="utf-8"))
    batch = torch.tensor([ids[start : start + 320] for start in (0, 2000, 4000)])  # (3, 320)
    with torch.no_grad():
        ours, theirs = model(batch)[0], reference(batch).logits  # (3, 320, 49152) each
    assert (ours - theirs).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_continuations_equal_transformers_for_64_tokens(smollm2, smollm2_transformers):
    """64 tokens each, past the end of the answer (no stop token on either side), for five chat prompts."""
    from transformers import GenerationConfig

    from llm.generate import generate

    model, tokenizer = smollm2
    reference = smollm2_transformers
    greedy = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=[], pad_token_id=0)
    for question in CHAT_PROMPTS:
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
        ours = generate(model, prompt_ids, 64, temperature=0, eos_id=None)
        with torch.no_grad():
            output = reference.generate(torch.tensor([prompt_ids]), generation_config=greedy,
                                        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        assert len(ours) == 64 and ours == output[0, len(prompt_ids) :].tolist(), question
        if question == CHAT_PROMPTS[0]:
            answer = ours[: ours.index(tokenizer.eos_id()) + 1]  # where a chat stops: the first <|im_end|>
            assert tokenizer.decode(answer) == "The capital of France is Paris."
