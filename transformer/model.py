"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written out.

Read top to bottom: config, layer norm, attention (eq. 1-2), multi-head attention (eq. 3), feed-forward
(eq. 4), positional encoding (eq. 5), the encoder and decoder layers (eq. 6-7), then the model with its
tied embeddings (eq. 8) and the one-token-at-a-time decoding step that reuses cached keys and values.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    """Sizes and switches of the model; saved in every checkpoint as a plain dict.

    The defaults are the model of the README's results table; train.py takes its flags' defaults from here.
    """

    vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    d_ff: int = 1024
    dropout: float = 0.1
    max_len: int = 256  # the longest sequence the positional encoding covers
    pad_id: int = 0
    norm_first: bool = False  # False: the paper's post-norm; True: pre-norm
    attention: str = "handwritten"  # "handwritten" (eq. 1 written out) or "fused" (F.scaled_dot_product_attention)

    def to_dict(self) -> dict:
        """The config as a dict that torch.load(weights_only=True) accepts."""
        return asdict(self)


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, written out (checked against nn.LayerNorm in the tests)."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one pass for both statistics; the biased variance, as in nn.LayerNorm
        variance, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)  # (..., 1) each
        return self.weight * (x - mean) * torch.rsqrt(variance + self.eps) + self.bias


def scaled_dot_product_attention(query, key, value, allowed=None, dropout: float = 0.0):
    """Eq. 1: softmax(Q K^T / sqrt(d_k) + mask) V; `allowed` is True where a query may look at a key."""
    d_k = query.size(-1)
    attention_scores = query @ key.transpose(-2, -1) / math.sqrt(d_k)  # (B, h, Tq, Tk)
    if allowed is not None:
        # a masked key gets -inf before the softmax, so it receives exactly zero weight
        attention_scores = attention_scores.masked_fill(~allowed, float("-inf"))
    attention_weights = attention_scores.softmax(dim=-1)  # (B, h, Tq, Tk), each row sums to 1
    # dropout on the weights, as the fused kernel does, so that both paths train the same model
    attended = F.dropout(attention_weights, dropout) @ value if dropout > 0 else attention_weights @ value
    return attended, attention_weights  # (B, h, Tq, d_k), (B, h, Tq, Tk)


class MultiHeadAttention(nn.Module):
    """Eq. 3: h heads attend in parallel in d_model/h-sized subspaces; their outputs are concatenated and mixed."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        assert config.d_model % config.num_heads == 0, "d_model must be divisible by num_heads"
        self.num_heads = config.num_heads
        self.head_size = config.d_model // config.num_heads
        self.fused = config.attention == "fused"
        self.query_projection = nn.Linear(config.d_model, config.d_model)
        self.key_projection = nn.Linear(config.d_model, config.d_model)
        self.value_projection = nn.Linear(config.d_model, config.d_model)
        self.output_projection = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.keep_weights = False  # set True to keep the last attention weights (for the heat-map)
        self.last_weights = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, h, T, d_k)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d_k) -> (B, T, d_model): the concatenation of eq. 3."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_size)

    def project_keys_values(self, source: torch.Tensor):
        """The keys and values of a sequence, split into heads: (B, h, Tk, d_k) each."""
        return self.split_heads(self.key_projection(source)), self.split_heads(self.value_projection(source))

    def forward(self, query_input, key_value_input=None, allowed=None, keys_values=None, cache=None):
        """Attend from query_input (B, Tq, d) to key_value_input (B, Tk, d), or to precomputed keys_values.

        cache (a KeyValueCache) turns on incremental self-attention: the new keys/values are written into it and
        the queries attend to everything cached so far.
        """
        query = self.split_heads(self.query_projection(query_input))  # (B, h, Tq, d_k)
        if keys_values is None:
            keys_values = self.project_keys_values(query_input if key_value_input is None else key_value_input)
        key, value = keys_values  # (B, h, Tk, d_k) each
        if cache is not None:
            key, value = cache.append(key, value)  # (B, h, T_cached + Tq, d_k) each: views of the cache, no copy
        dropout = self.dropout if self.training else 0.0
        if self.fused and not self.keep_weights:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout)
        else:
            attended, weights = scaled_dot_product_attention(query, key, value, allowed, dropout)
            if self.keep_weights:
                self.last_weights = weights.detach()
        return self.output_projection(self.merge_heads(attended))  # (B, Tq, d_model)


class KeyValueCache:
    """The self-attention keys and values of one decoder layer while decoding, preallocated to the longest output.

    Step t writes its one new key and value in place at position t and attends to a view of positions 0..t. Growing
    the cache with torch.cat instead would copy the whole prefix at every step, so a step would get dearer as the
    output grows; here a step costs the same at token 100 as at token 2 (apart from attention's own O(t) work).
    """

    def __init__(self, batch: int, num_heads: int, max_length: int, head_size: int, like: torch.Tensor):
        self.keys = like.new_zeros(batch, num_heads, max_length, head_size)  # (B, h, T_max, d_k)
        self.values = like.new_zeros(batch, num_heads, max_length, head_size)  # (B, h, T_max, d_k)
        self.length = 0  # positions filled so far

    def append(self, key: torch.Tensor, value: torch.Tensor):
        """Write the keys and values of the new positions (B, h, Tq, d_k) in place; return all filled positions."""
        end = self.length + key.size(2)
        if end > self.keys.size(2):
            raise ValueError(f"the cache holds {self.keys.size(2)} positions; position {end} does not fit")
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, h, end, d_k) each, views

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (B,), in place: beam search's surviving beams take over their parents' caches."""
        filled = slice(0, self.length)
        self.keys[:, :, filled] = self.keys[:, :, filled].index_select(0, index)  # (B, h, length, d_k)
        self.values[:, :, filled] = self.values[:, :, filled].index_select(0, index)


class FeedForward(nn.Module):
    """Eq. 4: FFN(x) = max(0, x W1 + b1) W2 + b2, applied to every position on its own."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.expand = nn.Linear(config.d_model, config.d_ff)
        self.contract = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contract(self.dropout(torch.relu(self.expand(x))))


def sinusoidal_positional_encoding(max_len: int, d_model: int) -> torch.Tensor:
    """Eq. 5: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)); (max_len, d_model)."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # (d/2,)
    encoding = torch.zeros(max_len, d_model)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class SublayerConnection(nn.Module):
    """Eq. 6: post-norm LayerNorm(x + Sublayer(x)), or pre-norm x + Sublayer(LayerNorm(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward(self, x, sublayer):
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward, each wrapped in a residual + LayerNorm."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attention = MultiHeadAttention(config)
        self.feed_forward = FeedForward(config)
        self.attention_sublayer = SublayerConnection(config)
        self.feed_forward_sublayer = SublayerConnection(config)

    def forward(self, x, source_allowed):
        x = self.attention_sublayer(x, lambda h: self.self_attention(h, allowed=source_allowed))
        return self.feed_forward_sublayer(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention over the target prefix, cross-attention to the encoder output, then the feed-forward."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attention = MultiHeadAttention(config)
        self.cross_attention = MultiHeadAttention(config)
        self.feed_forward = FeedForward(config)
        self.self_sublayer = SublayerConnection(config)
        self.cross_sublayer = SublayerConnection(config)
        self.feed_forward_sublayer = SublayerConnection(config)

    def forward(self, x, target_allowed, memory_keys_values, source_allowed, cache=None):
        x = self.self_sublayer(x, lambda h: self.self_attention(h, allowed=target_allowed, cache=cache))
        x = self.cross_sublayer(
            x, lambda h: self.cross_attention(h, keys_values=memory_keys_values, allowed=source_allowed)
        )
        return self.feed_forward_sublayer(x, self.feed_forward)


class Transformer(nn.Module):
    """The encoder-decoder with one shared source/target vocabulary and tied embedding / output weights."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.register_buffer("positional_encoding", sinusoidal_positional_encoding(config.max_len, config.d_model))
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        # pre-norm leaves the residual stream un-normalised, so each stack ends with one more LayerNorm
        self.encoder_norm = LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.decoder_norm = LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """Xavier-uniform matrices, zero biases; embeddings N(0, 1/d_model): times sqrt(d_model) they are N(0, 1)."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
            nn.init.zeros_(module.weight[module.padding_idx])

    def embed(self, token_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embedding times sqrt(d_model) plus the positional encoding of positions start, start+1, ..."""
        length = token_ids.size(1)
        if start + length > self.config.max_len:
            raise ValueError(f"sequence of {start + length} tokens is longer than max_len={self.config.max_len}")
        x = self.embedding(token_ids) * math.sqrt(self.config.d_model)  # (B, T, d_model)
        return self.embedding_dropout(x + self.positional_encoding[start : start + length])

    def source_mask(self, source_ids: torch.Tensor) -> torch.Tensor:
        """Padding mask: (B, 1, 1, Ts), True at real source tokens; broadcasts over heads and queries."""
        return (source_ids != self.config.pad_id)[:, None, None, :]

    def target_mask(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Causal and padding mask: (B, 1, Tt, Tt), True where query t may see key s (s <= t and s not padding)."""
        length = target_ids.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=target_ids.device).tril()  # (Tt, Tt)
        return causal & (target_ids != self.config.pad_id)[:, None, None, :]

    def encode(self, source_ids: torch.Tensor) -> torch.Tensor:
        """Source token ids (B, Ts) -> encoder output, the decoder's "memory" (B, Ts, d_model)."""
        source_allowed = self.source_mask(source_ids)
        x = self.embed(source_ids)
        for layer in self.encoder_layers:
            x = layer(x, source_allowed)
        return self.encoder_norm(x)

    def memory_keys_values(self, memory: torch.Tensor) -> list:
        """The cross-attention keys and values of every decoder layer, computed once per source sentence."""
        return [layer.cross_attention.project_keys_values(memory) for layer in self.decoder_layers]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 8: the pre-softmax projection shares its weight matrix with the embedding."""
        return F.linear(x, self.embedding.weight)  # (B, T, vocab) = x @ E^T, without materialising E^T

    def decode_hidden(self, target_ids, memory, source_ids):
        """The decoder stack over a whole target prefix (B, Tt) -> its last hidden states (B, Tt, d_model)."""
        target_allowed, source_allowed = self.target_mask(target_ids), self.source_mask(source_ids)
        x = self.embed(target_ids)
        for layer, keys_values in zip(self.decoder_layers, self.memory_keys_values(memory)):
            x = layer(x, target_allowed, keys_values, source_allowed)
        return self.decoder_norm(x)

    def decode(self, target_ids, memory, source_ids):
        """Teacher-forced decoder: target prefix ids (B, Tt) and memory -> next-token logits (B, Tt, vocab)."""
        return self.logits(self.decode_hidden(target_ids, memory, source_ids))

    def forward(self, source_ids, target_ids):
        """Training pass: (B, Ts) source and (B, Tt) shifted target -> (B, Tt, vocab) logits."""
        return self.decode(target_ids, self.encode(source_ids), source_ids)

    def start_decoding(self, source_ids, max_new_tokens: int | None = None) -> dict:
        """Encode once and keep what every later step reuses: the cross-attention keys/values of each decoder layer
        (computed here, once per sentence) and an empty, preallocated self-attention cache per layer."""
        memory = self.encode(source_ids)  # (B, Ts, d_model)
        max_length = self.config.max_len if max_new_tokens is None else min(max_new_tokens, self.config.max_len)
        batch, head_size = source_ids.size(0), self.config.d_model // self.config.num_heads
        return {
            "source_allowed": self.source_mask(source_ids),  # (B, 1, 1, Ts)
            "memory_keys_values": self.memory_keys_values(memory),  # per layer: (B, h, Ts, d_k) twice
            "self_caches": [KeyValueCache(batch, self.config.num_heads, max_length, head_size, memory)
                            for _ in self.decoder_layers],
            "length": 0,
        }

    def decode_step(self, new_token_ids: torch.Tensor, state: dict) -> torch.Tensor:
        """Incremental decoding: feed only the newest token (B, 1); keys/values of earlier ones come from the cache."""
        x = self.embed(new_token_ids, start=state["length"])  # (B, 1, d_model)
        for layer, keys_values, cache in zip(self.decoder_layers, state["memory_keys_values"], state["self_caches"]):
            # no causal mask needed: the cache holds only the past, so one query sees exactly its prefix
            x = layer(x, None, keys_values, state["source_allowed"], cache=cache)
        state["length"] += new_token_ids.size(1)
        return self.logits(self.decoder_norm(x))[:, -1]  # (B, vocab)


def reorder_state(state: dict, index: torch.Tensor) -> dict:
    """Beam search picked which beams survive: row i of every self-attention cache becomes row index[i], in place.

    The encoder's keys and values (and the source mask) stay as they are: beam search only ever moves a beam to
    another beam of the same sentence, and all beams of one sentence share the same source.
    """
    for cache in state["self_caches"]:
        cache.reorder(index)
    return state
