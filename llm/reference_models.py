"""Two well-known small-LLM training codebases' models, rebuilt layer for layer, for the speed comparison in bench.py.

- `Llama2cTransformer` follows the structure of `model.py` in Andrej Karpathy's llama2.c: separate wq/wk/wv/wo
  projections, RoPE applied to (even, odd) neighbour pairs through real cos/sin tables, `repeat_kv` for grouped-query
  attention, `F.scaled_dot_product_attention`, a SwiGLU feed-forward w2(silu(w1 x) * w3 x), RMSNorm computed in fp32,
  tied embeddings. At our default's arguments it has exactly our model's shape and parameter count.
- `NanoGPT` follows `model.py` in Karpathy's nanoGPT: GPT-2 with learned positions, LayerNorm with biases, one fused
  c_attn projection for q/k/v (no grouped-query attention), a 4x GELU MLP, tied embeddings. Same width, depth, heads,
  context and vocabulary as ours; it has more parameters (full-size keys and values, biases, position table).

Both return (logits, loss) like our Llama so that the same training step times all three. Only what training
touches is here: no generation, no checkpoint loading, no special initialisation (speed does not depend on it).
"""

import math
from dataclasses import dataclass

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
    ffn_hidden: int  # llama2.c's SwiGLU hidden size (nanoGPT's MLP is always 4 * d_model)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


# ---------------------------------------------------------------------------------------------- llama2.c

class Llama2cRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def llama2c_rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: (T, head_dim / 2) each."""
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), frequencies)  # (T, head_dim / 2)
    return torch.cos(angles), torch.sin(angles)


def llama2c_apply_rope(x, cos, sin):
    """Rotate each (even, odd) neighbour pair of channels: x (B, T, heads, head_dim)."""
    x_even, x_odd = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)  # (B, T, heads, head_dim / 2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, head_dim / 2)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(3)
    return rotated.type_as(x)  # (B, T, heads, head_dim)


class Llama2cAttention(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.n_heads, self.n_kv_heads = shape.n_heads, shape.n_kv_heads
        self.head_dim = shape.d_model // shape.n_heads
        self.wq = nn.Linear(shape.d_model, shape.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(shape.d_model, shape.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(shape.d_model, shape.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(shape.n_heads * self.head_dim, shape.d_model, bias=False)

    def forward(self, x, cos, sin):
        batch, length, _ = x.shape
        queries = self.wq(x).view(batch, length, self.n_heads, self.head_dim)
        keys = self.wk(x).view(batch, length, self.n_kv_heads, self.head_dim)
        values = self.wv(x).view(batch, length, self.n_kv_heads, self.head_dim)
        queries, keys = llama2c_apply_rope(queries, cos, sin), llama2c_apply_rope(keys, cos, sin)
        repeats = self.n_heads // self.n_kv_heads  # repeat_kv: each key/value head serves `repeats` query heads
        keys = keys[:, :, :, None, :].expand(-1, -1, -1, repeats, -1).reshape(batch, length, self.n_heads, -1)
        values = values[:, :, :, None, :].expand(-1, -1, -1, repeats, -1).reshape(batch, length, self.n_heads, -1)
        queries, keys, values = (t.transpose(1, 2) for t in (queries, keys, values))  # (B, heads, T, head_dim)
        output = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
        return self.wo(output.transpose(1, 2).contiguous().view(batch, length, -1))


class Llama2cFeedForward(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.w1 = nn.Linear(shape.d_model, shape.ffn_hidden, bias=False)
        self.w2 = nn.Linear(shape.ffn_hidden, shape.d_model, bias=False)
        self.w3 = nn.Linear(shape.d_model, shape.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Llama2cBlock(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.attention = Llama2cAttention(shape)
        self.feed_forward = Llama2cFeedForward(shape)
        self.attention_norm = Llama2cRMSNorm(shape.d_model, shape.norm_eps)
        self.ffn_norm = Llama2cRMSNorm(shape.d_model, shape.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama2cTransformer(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.tok_embeddings = nn.Embedding(shape.vocab_size, shape.d_model)
        self.layers = nn.ModuleList(Llama2cBlock(shape) for _ in range(shape.n_layers))
        self.norm = Llama2cRMSNorm(shape.d_model, shape.norm_eps)
        self.output = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # tied
        cos, sin = llama2c_rope_tables(shape.d_model // shape.n_heads, shape.context_length, shape.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, tokens, targets):
        length = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos, sin = self.freqs_cos[:length], self.freqs_sin[:length]
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.output(self.norm(h))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------------------------- nanoGPT

class NanoGPTLayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoGPTSelfAttention(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.n_heads = shape.n_heads
        self.c_attn = nn.Linear(shape.d_model, 3 * shape.d_model)  # q, k and v in one matmul
        self.c_proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x):
        batch, length, width = x.shape
        queries, keys, values = self.c_attn(x).split(width, dim=2)
        queries, keys, values = (t.view(batch, length, self.n_heads, -1).transpose(1, 2)
                                 for t in (queries, keys, values))  # (B, heads, T, head_dim)
        output = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
        return self.c_proj(output.transpose(1, 2).contiguous().view(batch, length, width))


class NanoGPTMLP(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.c_fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoGPTBlock(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.ln_1, self.attn = NanoGPTLayerNorm(shape.d_model), NanoGPTSelfAttention(shape)
        self.ln_2, self.mlp = NanoGPTLayerNorm(shape.d_model), NanoGPTMLP(shape)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.context_length, shape.d_model)  # learned positions
        self.h = nn.ModuleList(NanoGPTBlock(shape) for _ in range(shape.n_layers))
        self.ln_f = NanoGPTLayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for name, parameter in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layers))

    def forward(self, tokens, targets):
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = self.wte(tokens) + self.wpe(positions)  # (B, T, d)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


REFERENCE_MODELS = {"llama2.c": Llama2cTransformer, "nanoGPT": NanoGPT}


def training_flops_per_token(model: nn.Module, shape: ReferenceShape) -> float:
    """6 per weight that multiplies (embedding lookups and position tables excluded when untied) plus attention."""
    weights = sum(p.numel() for p in model.parameters())
    if isinstance(model, NanoGPT):
        weights -= model.wpe.weight.numel()  # a lookup, not a matmul
    return 6 * weights + 12 * shape.n_layers * shape.d_model * shape.context_length
