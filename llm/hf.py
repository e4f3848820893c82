"""Real Llama checkpoints in the hand-written model, and the hand-written model out to the tools everyone uses.

    model, tokenizer = load_hf_model("path/to/folder")            # or a hub name, e.g. HuggingFaceTB/SmolLM2-135M

A Hugging Face Llama folder holds config.json (the shape), model.safetensors (or model-0000k-of-0000n.safetensors
shards listed in model.safetensors.index.json) and the tokenizer (tokenizer.json, or a SentencePiece
tokenizer.model). Its tensors map one to one onto ours, except that we keep the query/key/value projections in one
matrix (rows [W_q; W_k; W_v]) and the SwiGLU gate/up projections in one matrix (rows [W_gate; W_up]): importing
concatenates them, exporting splits them. Both read the one table of names, HF_NAMES below (and in llm/README.md).

Rotary pairing: we rotate the pairs (x_i, x_{i+d/2}) (the two halves of a head), as Hugging Face does. Meta's
original checkpoints and llama2.c rotate neighbours (x_{2i}, x_{2i+1}); their query/key rows need the permutation
neighbour_pairs_to_halves (load_meta_checkpoint applies it).
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from llm.model import Llama, LlamaConfig
from llm.runs import CheckpointError

# Our tensor -> the Hugging Face tensors it holds, per layer N: the one table of names, read by import and export.
# Two of ours fuse several of theirs, one block of rows after another in the order listed.
HF_NAMES = {
    "embedding.weight": ["model.embed_tokens.weight"],
    "blocks.N.attention_norm.weight": ["model.layers.N.input_layernorm.weight"],
    "blocks.N.attention.qkv_proj.weight": ["model.layers.N.self_attn.q_proj.weight",  # [W_q; W_k; W_v]
                                           "model.layers.N.self_attn.k_proj.weight",
                                           "model.layers.N.self_attn.v_proj.weight"],
    "blocks.N.attention.out_proj.weight": ["model.layers.N.self_attn.o_proj.weight"],
    "blocks.N.ffn_norm.weight": ["model.layers.N.post_attention_layernorm.weight"],
    "blocks.N.ffn.gate_up_proj.weight": ["model.layers.N.mlp.gate_proj.weight",  # [W_gate; W_up]
                                         "model.layers.N.mlp.up_proj.weight"],
    "blocks.N.ffn.down_proj.weight": ["model.layers.N.mlp.down_proj.weight"],
    "final_norm.weight": ["model.norm.weight"],
    "output_proj.weight": ["lm_head.weight"],  # untied models only: tied ones reuse embed_tokens
}
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # owner/name as on huggingface.co (or a bare legacy name)
DOWNLOADED_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


# ---------------------------------------------------------------------------------------------- configuration


def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a Hugging Face config.json; anything outside the Llama family is refused."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: projections with biases are not part of this Llama (attention_bias/mlp_bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
    # transformers 5 writes rope_parameters (with rope_theta inside); older files write rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial rotary embeddings are not supported")
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(rope_scaling="llama3", rope_scale=float(rope["factor"]),
                       rope_low_frequency_factor=float(rope["low_freq_factor"]),
                       rope_high_frequency_factor=float(rope["high_freq_factor"]),
                       rope_original_context=int(rope["original_max_position_embeddings"]))
    elif rope_type == "linear":
        scaling = dict(rope_scaling="interpolation", rope_scale=float(rope["factor"]))
    elif rope_type != "default":
        raise CheckpointError(f"{source}: rope scaling {rope_type!r} is not supported (default, linear or llama3)")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_model=d_model, ffn_hidden=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **scaling,
    )


def hf_config_from_ours(config: LlamaConfig, eos_id: int | None, bos_id: int | None = None) -> dict:
    """The config.json that makes transformers build the same model (float32 weights)."""
    rope_theta, rope_scaling = config.rope_theta, None
    if config.rope_scaling == "ntk":  # our static NTK scaling is a larger base, which any Llama reader understands
        rope_theta = config.rope_theta * config.rope_scale ** (config.head_dim / (config.head_dim - 2))
    elif config.rope_scaling == "interpolation":
        rope_scaling = {"rope_type": "linear", "factor": config.rope_scale}
    elif config.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": config.rope_scale,
                        "low_freq_factor": config.rope_low_frequency_factor,
                        "high_freq_factor": config.rope_high_frequency_factor,
                        "original_max_position_embeddings": config.rope_original_context}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": "float32", "use_cache": True,
    }


# ------------------------------------------------------------------------------------------------------ weights


def layer_names(config: LlamaConfig) -> list[tuple[str, list[str]]]:
    """HF_NAMES written out for every layer of this model: (our name, [their names]); no lm_head when tied."""
    pairs = []
    for ours, theirs in HF_NAMES.items():
        if ours == "output_proj.weight" and config.tie_embeddings:
            continue
        for n in range(config.n_layers) if ".N." in ours else [None]:
            number = f".{n}."
            pairs.append((ours.replace(".N.", number), [name.replace(".N.", number) for name in theirs]))
    return pairs


def fused_rows(config: LlamaConfig, names: list[str]) -> list[int]:
    """The rows each of these Hugging Face matrices takes inside our fused one (q, k, v or gate, up)."""
    query, key_value = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    rows = {"q_proj": query, "k_proj": key_value, "v_proj": key_value, "gate_proj": config.ffn_hidden,
            "up_proj": config.ffn_hidden}
    return [rows[name.split(".")[-2]] for name in names]


def ours_from_hf_tensors(get, config: LlamaConfig, dtype=torch.float32) -> dict:
    """Our state dict from Hugging Face tensors; get(name) returns one tensor (read lazily, one at a time)."""
    state = {}
    for ours, theirs in layer_names(config):
        parts = [get(name).to(dtype) for name in theirs]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)  # fused: their rows one block after another
    return state


def hf_tensors_from_ours(model: Llama) -> dict:
    """Hugging Face names -> tensors (contiguous copies) of our model; the inverse of ours_from_hf_tensors."""
    config, state, tensors = model.config, model.state_dict(), {}
    for ours, theirs in layer_names(config):
        parts = state[ours].split(fused_rows(config, theirs)) if len(theirs) > 1 else [state[ours]]
        tensors.update(zip(theirs, parts))
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}


def neighbour_pairs_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection trained to rotate neighbours (x_2i, x_2i+1) so that our rotation
    of halves (x_i, x_{i+d/2}) sees the same pairs: in each head, the even rows come first, then the odd rows."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def halves_to_neighbour_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of neighbour_pairs_to_halves: rows of pair i go back to places 2i and 2i+1."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


class ImportedLlama(Llama):
    """Our Llama, built to receive weights read from a file: no random initialisation.

    It would be thrown away at once, and on the meta device (where the empty model is built) normal_ also loads
    torch's slow Python reference kernels (a second or more).
    """

    def _init_weights(self, module):
        pass


def model_from_state(config: LlamaConfig, state: dict, source: str) -> Llama:
    """Build the model without weights (on the meta device, no memory) and move the given tensors in."""
    with torch.device("meta"):
        model = ImportedLlama(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: tensors do not fit the config: {str(error).splitlines()[0]}") from None
    model.set_rope_table(config.context_length)  # the rope table was built on the meta device too
    return model.eval()


# --------------------------------------------------------------------------------------------- reading folders


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named in model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{folder}: no model.safetensors (or shards with an index) in this folder")


def load_hf_folder(folder, dtype=torch.float32) -> Llama:
    """Our Llama with the weights of a local Hugging Face folder (config.json + safetensors)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({error})") from None
    config = config_from_hf(hf_config, str(folder / "config.json"))
    handles = {}
    try:
        for path in safetensors_files(folder):
            handle = safe_open(str(path), framework="pt")
            handles.update({name: handle for name in handle.keys()})
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: say which
        raise CheckpointError(f"{folder}: unreadable safetensors file ({str(error).splitlines()[0]})") from None

    def get(name: str) -> torch.Tensor:
        if name not in handles:
            raise CheckpointError(f"{folder}: tensor {name} is missing")
        return handles[name].get_tensor(name)

    return model_from_state(config, ours_from_hf_tensors(get, config, dtype), str(folder))


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local folder as it is; a hub name (owner/name) downloaded into the usual Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local or not HUB_NAME.fullmatch(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such folder (and not a hub name like owner/model)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=DOWNLOADED_FILES))
    except GatedRepoError:
        reason = "the repository is gated: accept its licence on huggingface.co and log in with `hf auth login`"
    except RepositoryNotFoundError:
        reason = "no such repository on the hub"
    except Exception as error:  # noqa: BLE001 - offline, refused connection, timeout, proxy: all mean unreachable
        reason = f"the hub is unreachable: {type(error).__name__}"
    raise CheckpointError(
        f"cannot get {name_or_path} from the Hugging Face hub ({reason}); on a machine with network run "
        f"`hf download {name_or_path} --local-dir DIR`, copy DIR here and pass --hf DIR")


# ----------------------------------------------------------------------------------------------------- tokenizer


class HFTokenizer:
    """A checkpoint's own tokenizer with the calls generate.py makes (encode, decode, eos_id) and those a chat
    makes: apply_chat_template(messages), stop_ids (ids that end an assistant turn), chat_template, vocab_size.

    tokenizer.json is read with `tokenizers` (its post-processor adds the beginning-of-sequence token where the
    model expects one); a folder with only a SentencePiece tokenizer.model is read with `sentencepiece`.
    """

    def __init__(self, folder):
        folder = Path(folder)
        settings = read_json(folder / "tokenizer_config.json")
        self.sentencepiece = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.bos = None
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            self.sentencepiece = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            wants_bos = settings.get("add_bos_token", True) and self.sentencepiece.bos_id() >= 0
            self.bos = self.sentencepiece.bos_id() if wants_bos else None
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")
        self.eos = self.find_eos(folder, settings)
        self.vocab_size = (self.sentencepiece.get_piece_size() if self.sentencepiece is not None
                           else self.tokenizer.get_vocab_size())
        self.special_tokens = {name: token.get("content") if isinstance(token, dict) else token
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if (token := settings.get(name))}
        self.chat_template = find_chat_template(folder, settings)
        self.stop_ids = self.find_stop_ids(folder)
        self.stop_strings = ()

    def find_eos(self, folder: Path, settings: dict) -> int | None:
        """The end-of-sequence id: generation_config.json, else config.json, else the tokenizer's eos_token."""
        for source in (read_json(folder / "generation_config.json"), read_json(folder / "config.json")):
            eos = source.get("eos_token_id")
            if isinstance(eos, list) and eos:
                return int(eos[0])
            if isinstance(eos, int):
                return eos
        token = settings.get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token and self.sentencepiece is None:
            return self.tokenizer.token_to_id(token)
        return self.sentencepiece.eos_id() if self.sentencepiece is not None else None

    def encode(self, text: str) -> list[int]:
        if self.sentencepiece is not None:
            return ([self.bos] if self.bos is not None else []) + self.sentencepiece.encode(text)
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        if self.sentencepiece is not None:
            return self.sentencepiece.decode([i for i in ids if i != self.bos])
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def eos_id(self) -> int | None:
        return self.eos

    def find_stop_ids(self, folder: Path) -> tuple[int, ...]:
        """Every end-of-sequence id generation_config.json lists (an instruct model often has several), the
        tokenizer's own, and the end-of-turn markers of the common chat formats where the vocabulary has them."""
        listed = read_json(folder / "generation_config.json").get("eos_token_id")
        ids = [*(listed if isinstance(listed, list) else [listed]), self.eos]
        if self.sentencepiece is None:
            ids += [self.tokenizer.token_to_id(marker) for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>")]
        return tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation written in the checkpoint's own chat template (see llm/chat_template.py)."""
        from llm.chat_template import render_chat_template

        return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def find_chat_template(folder: Path, settings: dict) -> str | None:
    """chat_template.jinja (transformers writes it there since 4.43), else tokenizer_config.json's chat_template."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((item.get("template") for item in template if item.get("name") == "default"), None)
    return template or None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def load_hf_model(name_or_path: str, device="cpu", dtype=torch.float32) -> tuple[Llama, HFTokenizer]:
    """Our Llama and the checkpoint's tokenizer, from a local folder or a hub name."""
    folder = resolve_checkpoint(name_or_path)
    model = load_hf_folder(folder, dtype).to(device)
    return model, HFTokenizer(folder)


# ---------------------------------------------------------------------- SentencePiece -> Hugging Face tokenizer


def tokenizer_json_from_sentencepiece(model_path):
    """Rebuild our SentencePiece BPE model as a `tokenizers` BPE that encodes every text to the same ids.

    SentencePiece BPE keeps no merge list: it merges, anywhere in the word, the adjacent pair whose joined piece
    has the best score. Listing, for every piece, the ways it splits into two pieces of the vocabulary, ranked by
    its score, gives the same merges. The normaliser reproduces SentencePiece's: outer spaces removed, runs of
    spaces made one, a space prepended, spaces written as U+2581; the newline stays a piece of its own.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    vocabulary = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    ranked = []
    for piece, index in vocabulary.items():
        if processor.is_byte(index) or processor.is_control(index) or processor.is_unknown(index):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocabulary
                  and piece[k:] in vocabulary]
        splits.sort(key=lambda pair: (vocabulary[pair[0]], vocabulary[pair[1]]))
        ranked += [(-processor.get_score(index), index, pair) for pair in splits]
    merges = [pair for _, _, pair in sorted(ranked, key=lambda item: (item[0], item[1]))]
    unknown = processor.id_to_piece(processor.unk_id())
    tokenizer = Tokenizer(BPE(vocab=vocabulary, merges=merges, unk_token=unknown, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581"),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    specials = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                if processor.is_control(i) or processor.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    return tokenizer


# ------------------------------------------------------------------------------------------------------- export


def export_hf(model: Llama, tokenizer_path, out_dir) -> Path:
    """Write a folder that transformers' AutoModelForCausalLM and AutoTokenizer load with no custom code.

    write_hf_folder's files, with our SentencePiece tokenizer twice: tokenizer.model (what llama.cpp's converter
    reads) and the same tokenizer as tokenizer.json (what transformers reads).
    """
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if processor.get_piece_size() != model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {processor.get_piece_size()} pieces, the model "
                              f"{model.config.vocab_size}")
    eos_id = processor.eos_id() if processor.eos_id() >= 0 else None
    bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
    piece = processor.id_to_piece

    def write_tokenizer(folder: Path):
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        tokenizer_json_from_sentencepiece(tokenizer_path).save(str(folder / "tokenizer.json"))

    return write_hf_folder(model, out_dir, eos_id, bos_id, write_tokenizer, {
        "unk_token": piece(processor.unk_id()), "eos_token": piece(eos_id) if eos_id is not None else None,
        "bos_token": piece(bos_id) if bos_id is not None else None, "add_eos_token": False,
    })


def write_hf_folder(model: Llama, out_dir, eos_id, bos_id, write_tokenizer, tokenizer_settings: dict) -> Path:
    """The folder every export writes: config.json, generation_config.json, model.safetensors (float32), the
    tokenizer's files (write_tokenizer(folder) writes them) and tokenizer_config.json (tokenizer_settings added),
    all written into a temporary folder and renamed into place, so a failure never leaves half a folder."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        write_json(staging / "config.json", hf_config_from_ours(model.config, eos_id, bos_id))
        write_json(staging / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
        save_file(hf_tensors_from_ours(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(staging)
        write_json(staging / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.context_length,
            "add_bos_token": False, "clean_up_tokenization_spaces": False, **tokenizer_settings,
        })
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def write_json(path: Path, value: dict):
    path.write_text(json.dumps(value, indent=2) + "\n")


# -------------------------------------------------------------------------------- Meta's original checkpoints


# Meta's original layout names the same tensors otherwise (Hugging Face name -> Meta's, per layer N).
META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.N.input_layernorm.weight": "layers.N.attention_norm.weight",
    "model.layers.N.post_attention_layernorm.weight": "layers.N.ffn_norm.weight",
    "model.layers.N.self_attn.q_proj.weight": "layers.N.attention.wq.weight",
    "model.layers.N.self_attn.k_proj.weight": "layers.N.attention.wk.weight",
    "model.layers.N.self_attn.v_proj.weight": "layers.N.attention.wv.weight",
    "model.layers.N.self_attn.o_proj.weight": "layers.N.attention.wo.weight",
    "model.layers.N.mlp.gate_proj.weight": "layers.N.feed_forward.w1.weight",
    "model.layers.N.mlp.up_proj.weight": "layers.N.feed_forward.w3.weight",
    "model.layers.N.mlp.down_proj.weight": "layers.N.feed_forward.w2.weight",
}


def load_meta_checkpoint(folder, context_length: int = 4096, dtype=torch.float32) -> Llama:
    """A checkpoint in Meta's original layout (params.json + consolidated.00.pth), whose RoPE rotates neighbours.

    Names differ (wq, wk, wv, wo, w1 = gate, w3 = up, w2 = down, tok_embeddings, norm, output), and the query and
    key rows are permuted by neighbour_pairs_to_halves; everything else is the same model.
    """
    folder = Path(folder)
    params = read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not params or len(shards) != 1:
        raise CheckpointError(f"{folder}: expected params.json and one consolidated.00.pth")
    weights = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    scaling = {}
    if params.get("use_scaled_rope"):  # Llama 3.1 and later
        scaling = dict(rope_scaling="llama3", rope_scale=8.0, rope_low_frequency_factor=1.0,
                       rope_high_frequency_factor=4.0, rope_original_context=8192)
    config = LlamaConfig(
        vocab_size=weights["tok_embeddings.weight"].shape[0], context_length=context_length,
        n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=params["dim"],
        ffn_hidden=weights["layers.0.feed_forward.w1.weight"].shape[0],
        rope_theta=float(params.get("rope_theta", 10000.0)), norm_eps=float(params.get("norm_eps", 1e-5)),
        tie_embeddings="output.weight" not in weights, **scaling,
    )

    def get(name: str) -> torch.Tensor:  # a Hugging Face name -> Meta's tensor, query/key rows permuted
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)  # (number, the rest of the name)
        if layer is None:
            meta = META_NAMES[name]
        else:
            meta = META_NAMES["model.layers.N." + layer[2]].replace(".N.", f".{layer[1]}.")
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return neighbour_pairs_to_halves(weights[meta], n_heads if "q_proj" in name else n_kv_heads)
        return weights[meta]

    return model_from_state(config, ours_from_hf_tensors(get, config, dtype), str(folder))


def parameter_bytes(model: Llama) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def describe(model: Llama) -> str:
    """One line on the imported model's shape."""
    config = model.config
    scaling = f" ({config.rope_scaling} x{config.rope_scale:g})" if config.rope_scaling != "none" else ""
    return (f"{model.num_parameters() / 1e6:.1f} M parameters, {config.n_layers} layers, d {config.d_model}, "
            f"{config.n_heads} heads / {config.n_kv_heads} KV heads, vocabulary {config.vocab_size:,}, "
            f"{'tied' if config.tie_embeddings else 'untied'} output, RoPE base {config.rope_theta:g}{scaling}, "
            f"context {config.context_length:,}")
