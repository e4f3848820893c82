"""A GRU written by hand (PyTorch's conventions and parameter layout) and the BiGRU tagger built on it.

Read top to bottom: the hand-written GRU, the torch.nn.GRU twin with the same interface, then the tagger
(character embeddings -> BiGRU -> tag scores -> softmax or CRF).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gru.crf import CRF


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """True where a position holds a real character, False on padding: (B, T)."""
    positions = torch.arange(max_length, device=lengths.device)  # (T,)
    return positions[None, :] < lengths[:, None]  # (B, T)


def reverse_within_lengths(sequences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence's first `length` steps and leave its padding where it is: (B, T, C) -> (B, T, C)."""
    batch_size, max_length, channels = sequences.shape
    positions = torch.arange(max_length, device=sequences.device)[None, :]  # (1, T)
    lengths = lengths.to(sequences.device)[:, None]  # (B, 1)
    source = torch.where(positions < lengths, lengths - 1 - positions, positions)  # (B, T)
    return sequences.gather(1, source[:, :, None].expand(batch_size, max_length, channels))


class HandwrittenGRU(nn.Module):
    """torch.nn.GRU written out: same equations, same gate order (r, z, n), same parameter names and shapes.

    Equations (numbered as in the README), for one layer and one direction:
      (1) r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)          reset gate
      (2) z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)          update gate
      (3) n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))     candidate state
      (4) h_t = (1 - z_t) * n_t + z_t * h_{t-1}                         new state
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.dropout = bidirectional, dropout
        self.num_directions = 2 if bidirectional else 1
        self.suffixes = ["", "_reverse"][: self.num_directions]
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size * self.num_directions
            shapes = {
                "weight_ih": (3 * hidden_size, layer_input_size),  # the three gates stacked, rows [r; z; n]
                "weight_hh": (3 * hidden_size, hidden_size),
                "bias_ih": (3 * hidden_size,),
                "bias_hh": (3 * hidden_size,),
            }
            for suffix in self.suffixes:
                for name, shape in shapes.items():  # torch.nn.GRU's names, e.g. weight_hh_l1_reverse
                    self.register_parameter(f"{name}_l{layer}{suffix}", nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every weight and bias, torch.nn.GRU's initialisation."""
        bound = self.hidden_size**-0.5
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def stacked(self, name: str, layer: int) -> torch.Tensor:
        """One parameter of a layer for all directions at once: (D, ...)."""
        return torch.stack([getattr(self, f"{name}_l{layer}{suffix}") for suffix in self.suffixes])

    def run_layer(self, layer_input, lengths, mask, initial_state, layer):
        """Run one layer, both directions side by side in one time loop: (B, T, I) -> (B, T, D*H), (D, B, H)."""
        batch_size, max_length, _ = layer_input.shape
        size = self.hidden_size
        # the reverse direction reads each sentence backwards; reversing inside the length keeps padding at the end
        direction_inputs = [layer_input]
        if self.bidirectional:
            direction_inputs.append(reverse_within_lengths(layer_input, lengths))
        inputs = torch.stack(direction_inputs)  # (D, B, T, I)
        weight_ih = self.stacked("weight_ih", layer)  # (D, 3H, I)
        weight_hh = self.stacked("weight_hh", layer)  # (D, 3H, H)
        bias_ih, bias_hh = self.stacked("bias_ih", layer), self.stacked("bias_hh", layer)  # (D, 3H)
        # hoisted out of the loop: the input halves of (1)-(3) for every step in one matrix product
        input_gates = torch.baddbmm(
            bias_ih[:, None, :], inputs.flatten(1, 2), weight_ih.transpose(1, 2)
        )  # (D, B*T, 3H)
        input_gates = input_gates.view(self.num_directions, batch_size, max_length, 3 * size).permute(2, 0, 1, 3)
        # unbind (not indexing) hands out the steps, so backward stacks their gradients once instead of T times
        input_reset_update = input_gates[..., : 2 * size].unbind(0)  # T slices of (D, B, 2H)
        input_candidate = input_gates[..., 2 * size :].unbind(0)  # T slices of (D, B, H)
        step_mask = mask.t()[:, None, :, None].unbind(0)  # T slices of (1, B, 1)
        weight_hh_t, bias_hh = weight_hh.transpose(1, 2), bias_hh[:, None, :]  # (D, H, 3H), (D, 1, 3H)
        hidden_state = initial_state  # (D, B, H)
        outputs = []
        for t in range(max_length):
            # the hidden halves of (1)-(3), all three gates in one batched matrix product
            hidden_gates = torch.baddbmm(bias_hh, hidden_state, weight_hh_t)  # (D, B, 3H)
            hidden_reset_update, hidden_candidate = hidden_gates.split([2 * size, size], dim=-1)
            # (1), (2): reset and update gates share one sigmoid
            reset_and_update = torch.sigmoid(input_reset_update[t] + hidden_reset_update)  # (D, B, 2H)
            reset_gate, update_gate = reset_and_update.chunk(2, dim=-1)  # (D, B, H) each
            # (3): the reset gate wipes channels of the hidden projection before it joins the input
            candidate = torch.tanh(torch.addcmul(input_candidate[t], reset_gate, hidden_candidate))  # (D, B, H)
            # (4): h = n + z (h - n), the update gate mixes candidate and old state; z = 1 copies the state
            new_state = torch.lerp(candidate, hidden_state, update_gate)  # (D, B, H)
            # on padding the state stays as it was, so padding never changes a result
            hidden_state = torch.where(step_mask[t], new_state, hidden_state)
            outputs.append(hidden_state)
        outputs = torch.stack(outputs, dim=2) * mask[None, :, :, None]  # (D, B, T, H), zero on padding
        direction_outputs = [outputs[0]]
        if self.bidirectional:
            direction_outputs.append(reverse_within_lengths(outputs[1], lengths))  # back to reading order
        return torch.cat(direction_outputs, dim=-1), hidden_state  # (B, T, D*H), (D, B, H)

    def forward(self, inputs, lengths, initial_state=None):
        """inputs (B, T, I), lengths (B,) -> outputs (B, T, D*H) zero on padding, final state (L*D, B, H)."""
        batch_size, max_length, _ = inputs.shape
        lengths = lengths.to(inputs.device)
        mask = lengths_to_mask(lengths, max_length)  # (B, T)
        if initial_state is None:
            initial_state = inputs.new_zeros(self.num_layers * self.num_directions, batch_size, self.hidden_size)
        layer_output, final_states = inputs, []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                layer_output = F.dropout(layer_output, self.dropout, self.training)
            layer_state = initial_state[layer * self.num_directions : (layer + 1) * self.num_directions]  # (D, B, H)
            layer_output, final_state = self.run_layer(layer_output, lengths, mask, layer_state, layer)
            final_states.append(final_state)
        return layer_output, torch.cat(final_states)  # (B, T, D*H), (L*D, B, H)


class TorchGRU(nn.GRU):
    """torch.nn.GRU behind the hand-written GRU's interface (packed sequences do the masking)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0):
        super().__init__(
            input_size, hidden_size, num_layers, batch_first=True, dropout=dropout, bidirectional=bidirectional
        )

    def forward(self, inputs, lengths, initial_state=None):
        """inputs (B, T, I), lengths (B,) -> outputs (B, T, D*H) zero on padding, final state (L*D, B, H)."""
        packed = nn.utils.rnn.pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, final_state = super().forward(packed, initial_state)
        outputs, _ = nn.utils.rnn.pad_packed_sequence(packed_outputs, batch_first=True, total_length=inputs.shape[1])
        return outputs, final_state


GRU_IMPLEMENTATIONS = {"handwritten": HandwrittenGRU, "torch": TorchGRU}


@dataclass
class TaggerConfig:
    """Everything needed to rebuild a tagger; saved as a dict in every checkpoint."""

    vocab_size: int
    num_tags: int
    embedding_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.2
    output: str = "crf"  # "crf" or "softmax"
    impl: str = "handwritten"  # "handwritten" or "torch"

    def to_dict(self) -> dict:
        """The config as a plain dict (checkpoint-safe)."""
        return asdict(self)


class Tagger(nn.Module):
    """Character embeddings -> bidirectional GRU -> one score per tag and character -> softmax or CRF."""

    def __init__(self, config: TaggerConfig):
        super().__init__()
        if config.output not in ("crf", "softmax") or config.impl not in GRU_IMPLEMENTATIONS:
            raise ValueError(f"unknown output {config.output!r} or impl {config.impl!r}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        self.gru = GRU_IMPLEMENTATIONS[config.impl](
            config.embedding_dim, config.hidden_size, config.num_layers, bidirectional=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,  # between stacked layers only
        )
        self.dropout = nn.Dropout(config.dropout)
        self.tag_scores = nn.Linear(2 * config.hidden_size, config.num_tags)
        self.crf = CRF(config.num_tags) if config.output == "crf" else None

    def emissions(self, char_ids, lengths):
        """Per-character tag scores: char_ids (B, T), lengths (B,) -> (B, T, K)."""
        embedded = self.dropout(self.embedding(char_ids))  # (B, T, E)
        states, _ = self.gru(embedded, lengths)  # (B, T, 2H): left context and right context of each character
        return self.tag_scores(self.dropout(states))  # (B, T, K)

    def loss(self, char_ids, tag_ids, lengths):
        """Negative log-likelihood per character (softmax: cross-entropy; CRF: sentence NLL / characters)."""
        scores = self.emissions(char_ids, lengths)  # (B, T, K)
        mask = lengths_to_mask(lengths.to(char_ids.device), char_ids.shape[1])  # (B, T)
        if self.crf is None:
            return F.cross_entropy(scores[mask], tag_ids[mask])
        return self.crf.neg_log_likelihood(scores, tag_ids, mask).sum() / mask.sum()

    @torch.no_grad()
    def decode(self, char_ids, lengths) -> list[list[int]]:
        """Best tag ids for each sentence (CRF: Viterbi over whole paths; softmax: best tag per character)."""
        scores = self.emissions(char_ids, lengths)  # (B, T, K)
        mask = lengths_to_mask(lengths.to(char_ids.device), char_ids.shape[1])  # (B, T)
        if self.crf is not None:
            return self.crf.viterbi(scores, mask)
        best = scores.argmax(-1).tolist()  # (B, T)
        return [row[:length] for row, length in zip(best, lengths.tolist())]
