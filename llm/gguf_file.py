"""A GGUF file (llama.cpp's format) in the hand-written model: the shape, the weights, the tokenizer, the chat template.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")          # dtype=torch.bfloat16 halves the memory

A GGUF file is a header of key/value metadata followed by tensors. The metadata holds what config.json and
tokenizer.json hold in a Hugging Face folder: `llama.block_count`, `llama.embedding_length`, ... become our
LlamaConfig; `tokenizer.ggml.tokens`, `.merges`, `.token_type` and the special ids become a byte-level BPE; and
`tokenizer.chat_template` is the conversation format the model was fine-tuned on, a Jinja template.

The tensors are usually quantized: a block of 32 weights (256 for the "K" types) stored as small integers with one
or two float16 scales, e.g. Q4_1 keeps w = d * q + m with q in 0..15. The `gguf` package (llama.cpp's own Python
reader) turns every block type it knows back into floats; we keep those floats (float32 or bfloat16), so the model
computes exactly what the quantized file describes, at the speed and memory of an unquantized one.

Two layouts differ from ours. GGUF writes a shape innermost-first ([columns, rows]); the reader hands us
(rows, columns) arrays as torch expects. And llama.cpp rotates neighbouring channels (x_2i, x_2i+1), so its
converter permuted the query and key rows of every Hugging Face checkpoint; neighbour_pairs_to_halves (llm/hf.py)
undoes that permutation, as it does for Meta's original checkpoints. GGUF_NAMES lists the tensor names.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from llm.chat_template import render_chat_template
from llm.hf import CheckpointError, model_from_state, neighbour_pairs_to_halves, ours_from_hf_tensors
from llm.model import Llama, LlamaConfig

# Hugging Face name (what ours_from_hf_tensors asks for) -> GGUF name, per layer N
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.N.input_layernorm.weight": "blk.N.attn_norm.weight",
    "model.layers.N.self_attn.q_proj.weight": "blk.N.attn_q.weight",
    "model.layers.N.self_attn.k_proj.weight": "blk.N.attn_k.weight",
    "model.layers.N.self_attn.v_proj.weight": "blk.N.attn_v.weight",
    "model.layers.N.self_attn.o_proj.weight": "blk.N.attn_output.weight",
    "model.layers.N.post_attention_layernorm.weight": "blk.N.ffn_norm.weight",
    "model.layers.N.mlp.gate_proj.weight": "blk.N.ffn_gate.weight",
    "model.layers.N.mlp.up_proj.weight": "blk.N.ffn_up.weight",
    "model.layers.N.mlp.down_proj.weight": "blk.N.ffn_down.weight",
}
# The split llama.cpp applies before byte-level BPE, by `tokenizer.ggml.pre` (llama-vocab.cpp). The GPT-2 rule is
# what the ByteLevel pre-tokenizer does by itself; the "smollm" family first cuts every digit apart.
GPT2_SPLIT = None
DIGITS_THEN_GPT2 = "digits"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "gpt-2": GPT2_SPLIT,
    "smollm": DIGITS_THEN_GPT2, "starcoder": DIGITS_THEN_GPT2, "refact": DIGITS_THEN_GPT2,
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values: special tokens, and added plain tokens


class GGUFError(CheckpointError):
    """A GGUF file we cannot read or do not support; printed as one line."""


# ---------------------------------------------------------------------------------------------------- reading


def open_gguf(path):
    """The file's metadata and tensor table (memory-mapped, nothing copied yet); GGUFError if it is not one."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except Exception as error:  # noqa: BLE001 - empty, truncated, not GGUF, an unknown type number: all unreadable
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise GGUFError(f"{path}: not a readable GGUF file ({reason})") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise GGUFError(f"{path}: truncated: tensor {tensor.name} has {tensor.data.nbytes} of its "
                            f"{tensor.n_bytes} bytes")
    return reader


def metadata(reader, key: str, default=None):
    """One metadata value as a Python object (str, int, float, bool or list); `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: str) -> LlamaConfig:
    """Our LlamaConfig from the `llama.*` metadata; anything outside the plain Llama is refused."""
    architecture = metadata(reader, "general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{source}: architecture {architecture!r} is not supported (only 'llama')")
    names = {tensor.name for tensor in reader.tensors}
    if metadata(reader, "llama.expert_count", 0):
        raise GGUFError(f"{source}: a mixture of experts (llama.expert_count) is not supported")
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{source}: per-pair RoPE frequency factors (rope_freqs.weight, Llama 3.1) are not supported")
    if any(name.endswith(".bias") for name in names):
        raise GGUFError(f"{source}: projections with biases are not part of this Llama")
    d_model, n_heads = metadata(reader, "llama.embedding_length"), metadata(reader, "llama.attention.head_count")
    if d_model is None or n_heads is None or metadata(reader, "llama.block_count") is None:
        raise GGUFError(f"{source}: llama.embedding_length, llama.attention.head_count or llama.block_count missing")
    head_dim = d_model // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if metadata(reader, key, head_dim) != head_dim:
            raise GGUFError(f"{source}: {key} {metadata(reader, key)} differs from the head size {head_dim}")
    scaling = {}
    rope_type = metadata(reader, "llama.rope.scaling.type", "none")
    if rope_type == "linear":
        scaling = dict(rope_scaling="interpolation", rope_scale=float(metadata(reader, "llama.rope.scaling.factor")))
    elif rope_type != "none":
        raise GGUFError(f"{source}: rope scaling {rope_type!r} is not supported (none or linear)")
    vocabulary = metadata(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    try:
        return LlamaConfig(
            vocab_size=int(vocabulary), context_length=int(metadata(reader, "llama.context_length", 2048)),
            n_layers=int(metadata(reader, "llama.block_count")), n_heads=int(n_heads),
            n_kv_heads=int(metadata(reader, "llama.attention.head_count_kv", n_heads)), d_model=int(d_model),
            ffn_hidden=int(metadata(reader, "llama.feed_forward_length")),
            rope_theta=float(metadata(reader, "llama.rope.freq_base", 10000.0)),
            norm_eps=float(metadata(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in names, **scaling,
        )
    except (TypeError, ValueError) as error:
        raise GGUFError(f"{source}: inconsistent llama.* metadata ({error})") from None


DEQUANTIZE_ROWS = 2048  # rows turned into floats at a time (a few MB of float32 temporaries, however large the tensor)


def dequantized(tensor, dtype: torch.dtype, source: str) -> torch.Tensor:
    """One tensor as floats of `dtype`, (rows, columns) as torch expects, whatever block type the file stores it in.

    A few thousand rows at a time, each written straight into the result: the gguf package makes float32
    temporaries as large as what it dequantizes (for an 8-bit embedding, the int8 values as floats, then their
    product with the scales), which for a whole 49,152-row embedding would pass 200 MB on top of the model.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind in ("I8", "I16", "I32", "I64", "F64"):
        raise GGUFError(f"{source}: tensor {tensor.name} is stored as {kind}, not as weights this model reads")
    data = tensor.data  # (rows, bytes per row) when quantized, (rows, columns) when stored as floats; (n,) a vector
    steps = range(0, len(data), DEQUANTIZE_ROWS) if data.ndim == 2 else [None]  # a vector (a norm's weights) at once
    result = None
    for start in steps:
        rows = data if start is None else data[start : start + DEQUANTIZE_ROWS]
        try:
            values = dequantize(rows, tensor.tensor_type)  # float32 numpy, (rows, columns) or (columns,)
        except NotImplementedError:
            raise GGUFError(f"{source}: tensor {tensor.name} is stored as {kind}, a type the gguf package cannot "
                            f"dequantize") from None
        values = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: F32 rows are a view of the file
        if start is None:
            return values.to(dtype)
        if result is None:
            result = torch.empty((len(data), values.size(1)), dtype=dtype)
        result[start : start + len(values)] = values
    return result


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor name: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers."):
        layer = parts[2]
        return GGUF_NAMES[".".join([*parts[:2], "N", *parts[3:]])].replace(".N.", f".{layer}.")
    return GGUF_NAMES[hf_name]


def load_gguf_model(reader, config: LlamaConfig, source: str, dtype=torch.float32) -> Llama:
    """Our Llama with the file's weights, dequantized one tensor at a time."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    expected = {gguf_name(name.replace(".N.", f".{n}.")) for name in GGUF_NAMES for n in range(config.n_layers)}
    if config.tie_embeddings:
        expected.discard("output.weight")
    if unknown := sorted(set(tensors) - expected):
        raise GGUFError(f"{source}: tensor {unknown[0]} is not part of a {config.n_layers}-layer Llama")

    def get(hf_name: str) -> torch.Tensor:
        name = gguf_name(hf_name)
        if name not in tensors:
            raise GGUFError(f"{source}: tensor {name} is missing")
        weight = dequantized(tensors[name], dtype, source)
        if name.endswith("attn_q.weight"):  # llama.cpp's neighbour order back to our halves (see the docstring)
            weight = neighbour_pairs_to_halves(weight, config.n_heads)
        elif name.endswith("attn_k.weight"):
            weight = neighbour_pairs_to_halves(weight, config.n_kv_heads)
        return weight

    try:
        state = ours_from_hf_tensors(get, config, dtype)
    except RuntimeError as error:  # a tensor whose shape does not fit the metadata
        raise GGUFError(f"{source}: tensors do not fit the metadata ({str(error).splitlines()[0]})") from None
    return model_from_state(config, state, source)


# -------------------------------------------------------------------------------------------------- tokenizer


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str, source: str):
    """A `tokenizers` byte-level BPE from the file's vocabulary and merges, split as llama.cpp splits for `pre`.

    In a byte-level vocabulary every byte has a printable stand-in (the space is "Ġ", the newline "Ċ"), so the
    tokens and merges are stored as plain strings. Control tokens such as <|im_start|> are matched whole in the
    text before any splitting, as llama.cpp does, and are left out of decoded text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: pre-tokenizer {pre!r} is not supported ({', '.join(sorted(PRE_TOKENIZERS))})")
    vocabulary = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(BPE(vocab=vocabulary, merges=pairs, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    if split is GPT2_SPLIT:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    kinds = list(token_types) or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, kinds) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, kinds) if kind == USER_DEFINED])
    return tokenizer


class GGUFTokenizer:
    """The tokenizer and chat template stored in a GGUF file, with the calls chat and generation make.

    encode(text) / decode(ids) as SentencePiece's, eos_id() (a method, as SentencePiece's), and for chat:
    apply_chat_template(messages, add_generation_prompt=True) -> str, stop_ids (the ids that end an assistant
    turn), stop_strings (none here), chat_template (the file's Jinja template, or None), vocab_size, special_tokens.
    """

    def __init__(self, reader, source: str):
        model_type = metadata(reader, "tokenizer.ggml.model")
        if model_type != "gpt2":
            raise GGUFError(f"{source}: tokenizer {model_type!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens = metadata(reader, "tokenizer.ggml.tokens")
        self.tokenizer = byte_level_bpe(tokens, metadata(reader, "tokenizer.ggml.merges", []),
                                        metadata(reader, "tokenizer.ggml.token_type", []),
                                        metadata(reader, "tokenizer.ggml.pre", "default"), source)
        self.vocab_size = len(tokens)
        ids = {name: metadata(reader, f"tokenizer.ggml.{name}_token_id")
               for name in ("bos", "eos", "unknown", "padding")}
        self.bos, self.eos = ids["bos"], ids["eos"]
        self.add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))
        # what a chat template may refer to, as transformers passes it: {{ bos_token }}, {{ eos_token }}, ...
        self.special_tokens = {f"{name.replace('unknown', 'unk').replace('padding', 'pad')}_token": tokens[index]
                               for name, index in ids.items() if index is not None and 0 <= index < len(tokens)}
        self.chat_template = metadata(reader, "tokenizer.chat_template")
        # a turn ends at the end-of-sequence token, or at the template's end-of-turn marker where it has one
        turn_ends = [self.tokenizer.token_to_id(marker) for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>")]
        self.stop_ids = tuple(dict.fromkeys(i for i in [self.eos, metadata(reader, "tokenizer.ggml.eot_token_id"),
                                                         *turn_ends] if i is not None))
        self.stop_strings = ()  # the stop ids suffice: the template's markers are whole tokens

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos, *ids] if self.add_bos and self.bos is not None else ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def eos_id(self) -> int | None:
        return self.eos

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def load_gguf(path, dtype=torch.float32, device="cpu") -> tuple[Llama, GGUFTokenizer]:
    """Our Llama and the file's own tokenizer (with its chat template) from a Llama-architecture GGUF file."""
    source = str(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, source)
    tokenizer = GGUFTokenizer(reader, source)
    if tokenizer.vocab_size != config.vocab_size:
        print(f"note: {source}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}",
              file=sys.stderr)
    for key in [key for key in reader.fields if key.startswith("tokenizer.ggml.")]:
        del reader.fields[key]  # the tokenizer has them now: the reader's copy (~90 MB of small arrays) goes first
    model = load_gguf_model(reader, config, source, dtype).to(device)
    return model, tokenizer


def describe_file(path) -> str:
    """What a GGUF file holds, in a few lines: its model, its tensor types, its chat template."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    from llm.hf import describe

    model, tokenizer = load_gguf(path)
    reader = open_gguf(path)
    types = Counter(GGMLQuantizationType(tensor.tensor_type).name for tensor in reader.tensors)
    example = [{"role": "user", "content": "What is the capital of France?"}]
    lines = [f"{metadata(reader, 'general.name', Path(path).name)}: {describe(model)}",
             "tensors: " + ", ".join(f"{count} {kind}" for kind, count in types.most_common()),
             f"tokenizer: byte-level BPE, {tokenizer.vocab_size:,} tokens, stops at ids {list(tokenizer.stop_ids)}"]
    if tokenizer.chat_template:
        lines += ["a conversation as the model reads it:", tokenizer.apply_chat_template(example)]
    return "\n".join(lines)


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Describe a Llama GGUF file as llm/gguf_file.py reads it.")
    parser.add_argument("path", help="the .gguf file")
    args = parser.parse_args()
    try:
        print(describe_file(args.path))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
