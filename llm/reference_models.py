"""Two well-known small-LLM training codebases' models, rebuilt from a reading of their `model.py`, for the speed
comparison in bench.py, at the settings their own `train.py` uses:

- llama2.c (Andrej Karpathy, github.com/karpathy/llama2.c): `ModelArgs` with `multiple_of = 32` and `dropout = 0.0`
  (its train.py); separate wq/wk/wv/wo projections; RMSNorm computed in fp32 (`x.float()`, then `type_as(x)`,
  times the gain); RoPE on (even, odd) neighbour pairs read as the real and imaginary parts of complex numbers,
  rotated with real cos/sin tables in fp32; `repeat_kv` (expand + reshape) for grouped-query attention;
  `F.scaled_dot_product_attention`; the feed-forward w2(silu(w1 x) * w3 x); tied embeddings; the loss kept in
  `last_loss` (its forward returns the logits alone). At our default's shape it has exactly our parameter count.
- nanoGPT (Andrej Karpathy, github.com/karpathy/nanoGPT): `GPTConfig` with `bias = False` and `dropout = 0.0` (its
  train.py's defaults): GPT-2 with learned positions, LayerNorm without bias, one fused c_attn projection for q/k/v
  (every head its own key and value), `F.scaled_dot_product_attention`, a 4x GELU MLP, tied embeddings.

The layers run the same operations in the same order as the originals (dropout modules of probability 0
included, they are called in the originals too). `--nanogpt-model PATH` and `--llama2c-model PATH` in bench.py
import a copy of the original `model.py` instead, to time it beside the rebuild.
"""

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ReferenceShape:
    """The shape both reference models are built at (bench.py fills it from our default config)."""

    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


# ---------------------------------------------------------------------------------------------- llama2.c


@dataclass
class Llama2cArgs:
    """llama2.c's ModelArgs (the field names are its own)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int | None = None
    multiple_of: int = 32  # its train.py
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0


class Llama2cRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.normalize(x.float()).type_as(x) * self.weight


def llama2c_rope_tables(head_dim: int, length: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: (T, head_dim / 2) each, fp32 (llama2.c: precompute_freqs_cis)."""
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    angles = torch.outer(torch.arange(length), frequencies).float()  # (T, head_dim / 2)
    return torch.cos(angles), torch.sin(angles)


def llama2c_apply_rope(query, key, cos, sin):
    """Rotate each (even, odd) neighbour pair, read as (real, imaginary): query/key (B, T, heads, head_dim)."""
    query_real, query_imaginary = query.float().reshape(query.shape[:-1] + (-1, 2)).unbind(-1)  # (B, T, H, hd/2)
    key_real, key_imaginary = key.float().reshape(key.shape[:-1] + (-1, 2)).unbind(-1)
    cos, sin = cos.view(1, cos.size(0), 1, cos.size(1)), sin.view(1, sin.size(0), 1, sin.size(1))  # (1, T, 1, hd/2)
    query_out_real = query_real * cos - query_imaginary * sin
    query_out_imaginary = query_real * sin + query_imaginary * cos
    key_out_real = key_real * cos - key_imaginary * sin
    key_out_imaginary = key_real * sin + key_imaginary * cos
    query_out = torch.stack([query_out_real, query_out_imaginary], dim=-1).flatten(3)  # (B, T, H, hd)
    key_out = torch.stack([key_out_real, key_out_imaginary], dim=-1).flatten(3)
    return query_out.type_as(query), key_out.type_as(key)


def llama2c_repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """(B, T, Hkv, hd) -> (B, T, Hkv * repeats, hd): each key/value head serves `repeats` query heads."""
    batch, length, kv_heads, head_dim = x.shape
    if repeats == 1:
        return x
    return x[:, :, :, None, :].expand(batch, length, kv_heads, repeats, head_dim).reshape(
        batch, length, kv_heads * repeats, head_dim)


class Llama2cAttention(nn.Module):
    def __init__(self, args: Llama2cArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.repeats = args.n_heads // args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.attn_dropout, self.resid_dropout = nn.Dropout(args.dropout), nn.Dropout(args.dropout)
        self.dropout = args.dropout

    def forward(self, x, cos, sin):
        batch, length, _ = x.shape
        query, key, value = self.wq(x), self.wk(x), self.wv(x)
        query = query.view(batch, length, self.n_heads, self.head_dim)  # (B, T, H, hd)
        key = key.view(batch, length, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        value = value.view(batch, length, self.n_kv_heads, self.head_dim)
        query, key = llama2c_apply_rope(query, key, cos, sin)
        key, value = llama2c_repeat_kv(key, self.repeats), llama2c_repeat_kv(value, self.repeats)  # (B, T, H, hd)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, T, hd)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=None,
                                                dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        output = output.transpose(1, 2).contiguous().view(batch, length, -1)  # (B, T, d)
        return self.resid_dropout(self.wo(output))


class Llama2cFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int | None, multiple_of: int, dropout: float):
        super().__init__()
        if hidden_dim is None:
            hidden_dim = int(2 * 4 * dim / 3)
            hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Llama2cBlock(nn.Module):
    def __init__(self, args: Llama2cArgs):
        super().__init__()
        self.attention = Llama2cAttention(args)
        self.feed_forward = Llama2cFeedForward(args.dim, args.hidden_dim, args.multiple_of, args.dropout)
        self.attention_norm = Llama2cRMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = Llama2cRMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention.forward(self.attention_norm(x), cos, sin)
        return h + self.feed_forward.forward(self.ffn_norm(h))


class Llama2cTransformer(nn.Module):
    """llama2.c's Transformer: forward(tokens, targets) returns the logits and keeps the loss in last_loss."""

    def __init__(self, args: Llama2cArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Llama2cBlock(args) for _ in range(args.n_layers))
        self.norm = Llama2cRMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # tied
        cos, sin = llama2c_rope_tables(args.dim // args.n_heads, args.max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.apply(normal_init)
        for name, parameter in self.named_parameters():  # its scaled init (of w3 and wo)
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))
        self.last_loss = None

    def forward(self, tokens, targets=None):
        length = tokens.shape[1]
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, d)
        cos, sin = self.freqs_cos[:length], self.freqs_sin[:length]
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        logits = self.output(h)  # (B, T, vocab)
        self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits


def normal_init(module: nn.Module):
    """N(0, 0.02) for every linear and embedding weight, zero biases (both codebases' _init_weights)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class LossFromLastLoss(nn.Module):
    """llama2.c's forward returns the logits and keeps the loss in .last_loss: this returns (logits, loss), the
    interface bench.py's training step calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        logits = self.model(tokens, targets)
        return logits, self.model.last_loss


# ---------------------------------------------------------------------------------------------- nanoGPT


@dataclass
class NanoGPTConfig:
    """nanoGPT's GPTConfig (the field names are its own), with its train.py's bias = False and dropout = 0."""

    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False


class NanoGPTLayerNorm(nn.Module):
    """LayerNorm with an optional bias (none at bias = False)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoGPTSelfAttention(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k and v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(config.dropout), nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        batch, length, width = x.size()
        query, key, value = self.c_attn(x).split(self.n_embd, dim=2)
        key = key.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        query = query.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
        value = value.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=None,
                                                dropout_p=self.dropout if self.training else 0, is_causal=True)
        output = output.transpose(1, 2).contiguous().view(batch, length, width)  # (B, T, d)
        return self.resid_dropout(self.c_proj(output))


class NanoGPTMLP(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoGPTBlock(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.ln_1, self.attn = NanoGPTLayerNorm(config.n_embd, config.bias), NanoGPTSelfAttention(config)
        self.ln_2, self.mlp = NanoGPTLayerNorm(config.n_embd, config.bias), NanoGPTMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: forward(tokens, targets) returns (logits, loss)."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(NanoGPTBlock(config) for _ in range(config.n_layer)),
            ln_f=NanoGPTLayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(normal_init)
        for name, parameter in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, tokens, targets=None):
        positions = torch.arange(0, tokens.size(1), dtype=torch.long, device=tokens.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(tokens) + self.transformer.wpe(positions))  # (B, T, d)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------------------------- building


def import_model_file(path: str, name: str):
    """A copy of an original model.py, imported as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, Path(path))
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_llama2c(shape: ReferenceShape, original=None) -> nn.Module:
    """llama2.c's model at `shape`, (logits, loss) from forward; original: its imported model.py (else the rebuild)."""
    settings = dict(dim=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                    vocab_size=shape.vocab_size, hidden_dim=None, multiple_of=32, norm_eps=shape.norm_eps,
                    max_seq_len=shape.context_length, dropout=0.0)
    if original is None:
        return LossFromLastLoss(Llama2cTransformer(Llama2cArgs(**settings)))
    return LossFromLastLoss(original.Transformer(original.ModelArgs(**settings)))


def build_nanogpt(shape: ReferenceShape, original=None) -> nn.Module:
    """nanoGPT's model at `shape` (bias False, dropout 0); original: its imported model.py (else the rebuild)."""
    settings = dict(block_size=shape.context_length, vocab_size=shape.vocab_size, n_layer=shape.n_layers,
                    n_head=shape.n_heads, n_embd=shape.d_model, dropout=0.0, bias=False)
    if original is None:
        return NanoGPT(NanoGPTConfig(**settings))
    return original.GPT(original.GPTConfig(**settings))


REFERENCE_MODELS = {"llama2.c": build_llama2c, "nanoGPT": build_nanogpt}


def training_flops_per_token(model: nn.Module, shape: ReferenceShape) -> float:
    """6 per weight that multiplies (a learned position table is a lookup, not a matmul) plus attention."""
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("wpe.weight"))
    return 6 * weights + 12 * shape.n_layers * shape.d_model * shape.context_length
