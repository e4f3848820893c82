"""A tiny Llama: RMSNorm, rotary positions, grouped-query attention, SwiGLU, tied embeddings.

Read top to bottom: the config, then the parts from smallest to largest (norm, rotary embedding,
attention, feed-forward, block), then the model with its initialisation and a KV cache for generation.
Equation numbers refer to llm/README.md.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    context_length: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads query heads share one key/value head
    d_model: int = 256
    ffn_multiple_of: int = 32  # the SwiGLU hidden size is rounded up to a multiple of this
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | interpolation | ntk | llama3: how positions past the trained length work
    rope_scale: float = 1.0  # the context extension factor used by interpolation / ntk / llama3
    rope_low_frequency_factor: float = 1.0  # llama3: pairs slower than original_context / this are interpolated
    rope_high_frequency_factor: float = 4.0  # llama3: pairs faster than original_context / this keep their speed
    rope_original_context: int = 8192  # llama3: the context length the model was first trained at
    norm_eps: float = 1e-5  # the epsilon of every RMSNorm (Eq. 1)
    ffn_hidden: int = 0  # the SwiGLU hidden size; 0 = 2/3 of 4*d_model, rounded up (set in __post_init__)
    tie_embeddings: bool = True  # logits through the embedding matrix (True) or a separate output projection
    dropout: float = 0.0
    attention_impl: str = "fused"  # handwritten (the softmax written out) | fused (scaled_dot_product_attention)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the head size d_model / n_heads must be even for rotary embeddings")
        if self.attention_impl not in ("handwritten", "fused"):
            raise ValueError(f"attention_impl must be handwritten or fused, not {self.attention_impl!r}")
        if self.rope_scaling not in ("none", "interpolation", "ntk", "llama3"):
            raise ValueError(f"rope_scaling must be none, interpolation, ntk or llama3, not {self.rope_scaling!r}")
        if not self.ffn_hidden:  # an imported checkpoint brings its own width
            # SwiGLU's 3 matrices at 2/3 of 4*d_model cost what a 4*d_model MLP's 2 do; rounded up to a multiple
            hidden = int(2 * 4 * self.d_model / 3)
            self.ffn_hidden = self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Eq. 1: x / sqrt(mean(x^2) + eps) * gain. No mean subtraction and no bias, unlike LayerNorm.

    The backward pass is written out (RMSNormFunction, Eq. 1b) rather than recorded op by op.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """Eq. 1 forward; Eq. 1b backward. With x_hat = x r, r = (mean(x^2) + eps)^(-1/2) and h = dL/dy * g:

        dL/dg = sum over positions of dL/dy * x_hat,    dL/dx = r (h - x_hat mean(h * x_hat))

    (r depends on every x_j: dr/dx_j = -r^3 x_j / d, which gives the second term.)
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x_float = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 even under bf16 autocast; float64 stays
        # mean(x^2) = ||x||^2 / d: one reduction over the channels, with no x^2 tensor written out
        mean_square = torch.linalg.vector_norm(x_float, dim=-1, keepdim=True).square_().div_(x.size(-1))  # (..., 1)
        inverse_rms = mean_square.add_(eps).rsqrt_()  # r (..., 1)
        ctx.save_for_backward(x, weight, inverse_rms)
        return (x_float * inverse_rms).type_as(x) * weight  # (..., d)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, inverse_rms = ctx.saved_tensors
        normalized = x.to(inverse_rms.dtype) * inverse_rms  # x_hat (..., d)
        grad_output = grad_output.to(inverse_rms.dtype)
        weighted = grad_output * normalized  # dL/dy * x_hat (..., d)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = weighted.reshape(-1, x.size(-1)).sum(0).type_as(weight)  # (d,)
        # mean(h * x_hat) = mean(dL/dy * x_hat * g): the products above, weighted by g and averaged in one product
        projection = (weighted @ weight.to(weighted.dtype)).div_(x.size(-1)).unsqueeze(-1)  # (..., 1)
        # r (h - x_hat mean(h x_hat)), computed in the buffers already written rather than in new ones
        grad_x = (grad_output * weight).sub_(normalized.mul_(projection)).mul_(inverse_rms)  # (..., d)
        return grad_x.type_as(x), grad_weight, None


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Eq. 4: the rotation speed theta_i = base^(-2i/d) of each pair of head channels, after any scaling."""
    head_dim = config.head_dim
    base = config.rope_theta
    if config.rope_scaling == "ntk":
        # NTK-aware: raise the base so the slowest pair stretches by `scale` while the fastest barely moves
        base = base * config.rope_scale ** (head_dim / (head_dim - 2))
    frequencies = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    if config.rope_scaling == "interpolation":
        # position interpolation: squeeze positions 0..scale*T back into 0..T
        frequencies = frequencies / config.rope_scale
    if config.rope_scaling == "llama3":
        # Llama 3.1: pairs whose wavelength exceeds original/low are interpolated (divided by the scale), pairs
        # whose wavelength is below original/high keep their speed, and the band between blends the two smoothly
        wavelengths = 2 * math.pi / frequencies  # (head_dim/2,) tokens per full turn of each pair
        original = config.rope_original_context
        low, high = config.rope_low_frequency_factor, config.rope_high_frequency_factor
        blend = ((original / wavelengths - low) / (high - low)).clamp(0, 1)  # 0 = interpolate, 1 = keep
        frequencies = (1 - blend) * frequencies / config.rope_scale + blend * frequencies
    return frequencies


def rope_cos_sin(config: LlamaConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(m * theta_i) and sin(m * theta_i) for positions m = 0..length-1, each (length, head_dim/2)."""
    positions = torch.arange(length, dtype=torch.float64)  # (length,)
    angles = torch.outer(positions, rope_frequencies(config))  # (length, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 5: turn each channel pair (x_i, x_{i+d/2}) of x (..., head_dim) by the angle whose cos and sin are given.

    cos and sin (..., head_dim/2) broadcast against x's halves: (T, 1, hd/2) for x (B, T, heads, head_dim).
    """
    # rotate in fp32 at least: one conversion of a bf16 x (not bf16 x fp32 products element by element), none of
    # an fp32 x, and a float64 model keeps float64
    first, second = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # each (..., hd/2)
    rotated_first = first * cos - second * sin
    rotated_second = first * sin + second * cos
    return torch.cat([rotated_first, rotated_second], dim=-1).type_as(x)  # x's shape


def rotate_into_one_buffer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate(), with each half of the result written in place into one new tensor: four passes over memory and no
    copy to join the halves, where rotate() makes seven. For eager training (RotaryFunction gives its backward):
    autograd cannot record writes into a slice, and a compiler fuses rotate()'s products into one loop itself."""
    x_float = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = x_float.chunk(2, dim=-1)  # each (..., hd/2)
    rotated = torch.empty_like(x_float)  # x's shape
    half = first.size(-1)
    torch.mul(first, cos, out=rotated[..., :half]).addcmul_(second, sin, value=-1)  # first cos - second sin
    torch.mul(first, sin, out=rotated[..., half:]).addcmul_(second, cos)  # first sin + second cos
    return rotated.type_as(x)


class RotaryFunction(torch.autograd.Function):
    """RoPE with its backward written out: a rotation is orthogonal, so the gradient of R(m theta) x with respect
    to x is R(m theta)^T dL/dy = R(-m theta) dL/dy, the same rotation turned back (cos stays, sin changes sign)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return RotaryFunction.rotation()(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        return RotaryFunction.rotation()(grad_output, cos, -sin), None, None

    @staticmethod
    def rotation():
        """Eq. 5 as written for a compiler to fuse; eager, the same rotation with fewer passes over memory."""
        return rotate if torch.compiler.is_compiling() else rotate_into_one_buffer


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 5 on queries or keys x (..., head_dim) at the positions whose cos/sin (..., head_dim/2) are given."""
    return RotaryFunction.apply(x, cos, sin)


def handwritten_causal_attention(query, key, value, query_start: int = 0) -> torch.Tensor:
    """Eq. 6: softmax(q k^T / sqrt(d) + causal mask) v, with the softmax written out.

    query (B, H, Tq, hd) holds positions query_start..query_start+Tq-1; key/value (B, Hkv, Tk, hd) positions
    0..Tk-1, each of the Hkv heads serving the H / Hkv query heads next to each other (grouped-query attention).
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.size(1)
    group = heads // kv_heads
    # the `group` query heads of one key/value head become extra rows of queries: each key is read in place, not copied
    query = query.reshape(batch, kv_heads, group * length, head_dim)  # (B, Hkv, group*Tq, hd)
    scores = query @ key.transpose(-2, -1) / math.sqrt(head_dim)  # (B, Hkv, group*Tq, Tk)
    query_positions = torch.arange(query_start, query_start + length, device=query.device).repeat(group)  # (g*Tq,)
    key_positions = torch.arange(key.size(-2), device=query.device)
    future = key_positions[None, :] > query_positions[:, None]  # (group*Tq, Tk): True where a key lies in the future
    scores = scores.masked_fill(future, float("-inf"))
    # softmax by hand: subtract the row maximum so exp never overflows, exponentiate, normalise. The shift leaves the
    # softmax unchanged, so it is a constant for the gradient (detach): its backward would add exactly nothing, and
    # compiled in bf16 it divides by zero (llm/README.md, Lab notes)
    scores = scores - scores.amax(dim=-1, keepdim=True).detach()
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, Hkv, group*Tq, Tk), rows sum to 1
    return (weights @ value).view(batch, heads, length, head_dim)  # (B, H, Tq, hd)


def fused_causal_attention(query, key, value, query_start: int = 0) -> torch.Tensor:
    """The same computation through torch's fused scaled_dot_product_attention, which reads each key/value head
    for its group of query heads in place (enable_gqa) instead of copying it."""
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # a CPU's fused kernel runs its bf16 backward at half the speed of its fp32 one (llm/README.md, Lab notes):
        # under bf16 autocast the attention stays in fp32 there; the matrix products around it are still bf16
        with torch.autocast("cpu", enabled=False):
            return fused_causal_attention(query.float(), key.float(), value.float(), query_start)
    if query_start == 0 and query.size(-2) == key.size(-2):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    query_positions = torch.arange(query_start, query_start + query.size(-2), device=query.device)
    allowed = torch.arange(key.size(-2), device=query.device)[None, :] <= query_positions[:, None]  # (Tq, Tk)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True)


class KVCache:
    """Keys and values of every layer for positions generated so far, sized for n_kv_heads (not n_heads).

    The cache keeps its own length: each layer writes the same new positions, and once the last layer has written
    them the length moves past them.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_length: int, device, dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (by every layer)
        self.max_length = max_length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store key/value (B, n_kv_heads, T, hd) at the next T positions; return all positions so far."""
        end = self.length + key.size(2)
        self.keys[layer, :, :, self.length : end] = key
        self.values[layer, :, :, self.length : end] = value
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if layer == self.keys.size(0) - 1:  # the last layer: the new positions are complete
            self.length = end
        return keys, values

    def clear(self):
        """Forget every position (the next forward pass fills the cache from position 0 again)."""
        self.length = 0

    def num_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


ATTENTION_IMPLS = {"handwritten": handwritten_causal_attention, "fused": fused_causal_attention}


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # one matmul computes query, key and value; the rows of qkv_proj.weight are [W_q; W_k; W_v]
        self.qkv_sizes = (config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim,
                          config.n_kv_heads * config.head_dim)
        self.qkv_proj = nn.Linear(config.d_model, sum(self.qkv_sizes), bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out_proj.is_residual_output = True
        self.attend = ATTENTION_IMPLS[config.attention_impl]

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start: int = 0, attention_mask=None):
        batch, length, _ = x.shape  # (B, T, d_model)
        heads, kv_heads = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(batch, length, heads + 2 * kv_heads, self.head_dim)  # (B, T, H + 2 Hkv, hd)
        query_key, value = qkv.split([heads + kv_heads, kv_heads], dim=2)  # (B, T, H + Hkv, hd), (B, T, Hkv, hd)
        # the H query heads and Hkv key heads sit side by side: one rotation turns them all (cos/sin (.., T, 1, hd/2))
        query_key = apply_rope(query_key, cos.unsqueeze(-2), sin.unsqueeze(-2))  # (B, T, H + Hkv, hd)
        query, key = query_key.split([heads, kv_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            key, value = cache.update(layer, key, value)  # each (B, Hkv, start+T, hd)
        group = self.n_heads // self.n_kv_heads
        if length == 1 and cache is not None and (self.attend is fused_causal_attention or attention_mask is not None):
            # generating: the one new position may see every cached key (of its row: attention_mask), and each key/value
            # head can take its `group` query heads as if they were query positions: the cache is read in place
            grouped = query.reshape(batch, self.n_kv_heads, group, self.head_dim)  # (B, Hkv, group, hd)
            attended = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask)  # (B,Hkv,group,hd)
            attended = attended.reshape(batch, self.n_heads, 1, self.head_dim)  # (B, H, 1, hd)
            return self.out_proj(attended.transpose(1, 2).reshape(batch, 1, -1))  # (B, 1, d_model)
        if attention_mask is not None:  # rows of different lengths: each query sees the keys its mask allows
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                      enable_gqa=True)  # (B, H, T, hd)
        else:
            attended = self.attend(query, key, value, start)  # (B, H, T, hd)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))  # (B, T, d_model)


class SwiGLU(nn.Module):
    """Eq. 7: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.down_proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each (B, T, ffn_hidden)
        return self.down_proj(F.silu(gate) * up)  # (B, T, d_model)


class Block(nn.Module):
    """Eq. 8: pre-norm residual block, x + Attention(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0, attention_mask=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cache, layer, start, attention_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))  # (B, T, d_model)


IGNORE_INDEX = -100  # a target that counts nowhere (a padded position), as in F.cross_entropy


class CrossEntropyFunction(torch.autograd.Function):
    """The training loss, the mean over positions of -log softmax(z)_y, with its gradient written out (Eq. 12a):
    d loss / d z = (softmax(z) - onehot(y)) / N, from the log-probabilities the forward pass kept (exponentiate,
    scale, subtract at each target). Positions whose target is IGNORE_INDEX count nowhere."""

    @staticmethod
    def forward(ctx, logits, targets):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V), in fp32 even for bf16 logits
        kept = targets != IGNORE_INDEX  # (N,)
        count = kept.sum()
        picked = log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (N,): log p(y_t)
        ctx.save_for_backward(log_probs, targets, kept, count)
        ctx.logits_dtype = logits.dtype
        return -(picked * kept).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        log_probs, targets, kept, count = ctx.saved_tensors
        row_scale = (kept * (grad_loss / count))[:, None]  # (N, 1): 1/N for a counted position, 0 for an ignored one
        # the gradient is written over the saved log-probabilities: writing it into a freshly allocated (N, V) buffer
        # cost more than the exponentials (README, Lab notes). A second backward through the same graph then finds
        # them changed and stops with autograd's error rather than giving a wrong gradient.
        grad = log_probs.exp_().mul_(row_scale)  # softmax(z) / N  (N, V)
        grad.scatter_add_(1, targets.clamp(min=0)[:, None], -row_scale)  # minus onehot(y) / N
        return grad.to(ctx.logits_dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,); F.cross_entropy is its torch reference (tested)."""
    if torch.compiler.is_compiling():
        # compiled, torch's loss lets the compiler derive Eq. 12a itself and fuse it into the softmax's loops, where
        # the hand-written backward's saved log-probabilities cost 11% of a compiled bf16 step (README, Lab notes)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    return CrossEntropyFunction.apply(logits, targets)


class Llama(nn.Module):
    """Token embedding -> n_layers blocks -> RMSNorm -> logits through the (tied) embedding matrix."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        # most small models reuse the embedding as the output projection; larger ones (Llama 2, 3 8B) learn a second
        self.output_proj = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.set_rope_table(config.context_length)
        self.apply(self._init_weights)

    def set_rope_table(self, length: int):
        """(Re)build cos/sin for `length` positions (e.g. after changing rope_scaling for a longer context)."""
        cos, sin = rope_cos_sin(self.config, length)
        device = self.embedding.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (length, head_dim/2)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module: nn.Module):
        """N(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2 n_layers) (Eq. 9)."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_output", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention_impl(self, name: str):
        """Compute Eq. 6 the hand-written or the fused way in every layer from now on (the same function, tested)."""
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be handwritten or fused, not {name!r}")
        self.config.attention_impl = name
        for block in self.blocks:
            block.attention.attend = ATTENTION_IMPLS[name]

    def num_parameters(self, include_embedding: bool = True) -> int:
        total = sum(parameter.numel() for parameter in self.parameters())
        return total if include_embedding else total - self.embedding.weight.numel()

    def flops_per_token(self, context_length: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight (forward 2 + backward 4) plus attention's 12 * layers * d * T."""
        length = context_length or self.config.context_length
        return 6 * self.num_parameters() + 12 * self.config.n_layers * self.config.d_model * length

    def forward(self, tokens, targets=None, cache: KVCache | None = None, positions=None, attention_mask=None,
                last_only: bool = False):
        """tokens (B, T) -> logits (B, T, vocab); with targets also the mean cross-entropy.

        Rows at different lengths (a server decoding several conversations in one batch) pass positions (B, T),
        each token's own position, and attention_mask (B, 1, T, Tk), True where a token may see a key; their cache
        (llm/batching.py) keeps each row's length itself. last_only: the logits (B, 1, vocab) of the last position
        alone, all that reading a prompt needs to choose the next token.
        """
        start = cache.length if cache is not None and positions is None else 0
        length = tokens.size(1)
        if positions is not None:
            cos = self.rope_cos[positions]  # (B, T, head_dim/2): each row turned by its own positions
            sin = self.rope_sin[positions]
        elif start + length > self.rope_cos.size(0):
            raise ValueError(f"sequence of {start + length} positions exceeds the rope table ({self.rope_cos.size(0)})")
        else:
            cos = self.rope_cos[start : start + length]  # (T, head_dim/2)
            sin = self.rope_sin[start : start + length]
        x = self.dropout(self.embedding(tokens))  # (B, T, d_model)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, start, attention_mask)  # the last block's write advances the cache
        x = self.final_norm(x[:, -1:] if last_only else x)
        if self.output_proj is None:
            logits = F.linear(x, self.embedding.weight)  # (B, T, vocab): x E^T in one call, without a transposed copy
        else:
            logits = self.output_proj(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
