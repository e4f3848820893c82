"""A GRU written by hand (PyTorch's conventions and parameter layout) and the BiGRU tagger built on it.

Read top to bottom: one GRU layer's forward over a whole sequence, the same layer with its backward pass
written by hand (GRULayerFunction), the hand-written GRU built from such layers, the torch.nn.GRU twin with
the same interface, then the tagger (character embeddings -> BiGRU -> tag scores -> softmax or CRF).
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


def gru_layer_forward(inputs, mask, initial_state, weight_ih, weight_hh, bias_ih, bias_hh, keep_for_backward=False):
    """Equations (1)-(6) over a whole sequence, both directions side by side on a leading axis D.

    inputs (D, B, T, I) (the reverse direction already reversed within lengths), mask (B, T) bool,
    initial_state (D, B, H), weight_ih (D, 3H, I), weight_hh (D, 3H, H), bias_ih and bias_hh (D, 3H)
    -> outputs (D, B, T, H) zero on padding, final state (D, B, H), and with keep_for_backward what the
    hand-written backward needs: the states h_0..h_T (T+1, D, B, H), the gates r, z (T, D, B, 2H), the
    candidates n (T, D, B, H) and the hidden candidate projections W_hn h_{t-1} + b_hn (T, D, B, H).
    Autograd can differentiate this function as it stands; GRULayerFunction runs it and differentiates by hand.
    """
    directions, batch_size, max_length, _ = inputs.shape
    size = weight_hh.shape[-1]
    # hoisted out of the loop: the input halves of (1)-(3) for every step in one matrix product
    input_gates = torch.baddbmm(bias_ih[:, None, :], inputs.flatten(1, 2), weight_ih.transpose(1, 2))  # (D, B*T, 3H)
    input_gates = input_gates.view(directions, batch_size, max_length, 3 * size).permute(2, 0, 1, 3)  # (T, D, B, 3H)
    # unbind (not indexing) hands out the steps, so autograd stacks their gradients once instead of T times
    input_reset_update = input_gates[..., : 2 * size].unbind(0)  # T slices of (D, B, 2H)
    input_candidate = input_gates[..., 2 * size :].unbind(0)  # T slices of (D, B, H)
    step_mask = mask.t()[:, None, :, None].unbind(0)  # T slices of (1, B, 1)
    weight_hh_t, bias_hh = weight_hh.transpose(1, 2), bias_hh[:, None, :]  # (D, H, 3H), (D, 1, 3H)
    hidden_state = initial_state  # (D, B, H)
    states, gates, candidates, hidden_candidates = [hidden_state], [], [], []
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
        # (6): on padding the state stays as it was, so padding never changes a result
        hidden_state = torch.where(step_mask[t], new_state, hidden_state)
        states.append(hidden_state)
        if keep_for_backward:
            gates.append(reset_and_update)
            candidates.append(candidate)
            hidden_candidates.append(hidden_candidate)
    states = torch.stack(states)  # (T+1, D, B, H): h_0 .. h_T
    outputs = (states[1:] * mask.t()[:, None, :, None]).permute(1, 2, 0, 3)  # (D, B, T, H), zero on padding
    if not keep_for_backward:
        return outputs, hidden_state
    return outputs, hidden_state, (states, torch.stack(gates), torch.stack(candidates), torch.stack(hidden_candidates))


class GRULayerFunction(torch.autograd.Function):
    """One GRU layer (all its directions) with the backward pass written out: equations (7)-(14) of the README."""

    @staticmethod
    def forward(ctx, inputs, mask, initial_state, weight_ih, weight_hh, bias_ih, bias_hh):
        """The same forward as gru_layer_forward, keeping only what the backward reads."""
        outputs, final_state, (states, gates, candidates, hidden_candidates) = gru_layer_forward(
            inputs, mask, initial_state, weight_ih, weight_hh, bias_ih, bias_hh, keep_for_backward=True
        )
        ctx.save_for_backward(inputs, mask, weight_ih, weight_hh, states, gates, candidates, hidden_candidates)
        return outputs, final_state

    @staticmethod
    def backward(ctx, grad_outputs, grad_final_state):
        """Backpropagation through time for the GRU, from the last step to the first."""
        inputs, mask, weight_ih, weight_hh, states, gates, candidates, hidden_candidates = ctx.saved_tensors
        directions, batch_size, max_length, _ = inputs.shape
        size = weight_hh.shape[-1]
        # the loop's result: each step's four gate gradients, slots [n of the input projection; r; z; n of the
        # hidden projection], so that the input projection's gradient is slots 0-2 (rows n, r, z) and the hidden
        # one's slots 1-3 (rows r, z, n, those of W_hh); laid out (D, B, T, 4, H) like the inputs
        grad_gates = candidates.new_empty(directions, batch_size, max_length, 4, size)
        step_grad_gates = grad_gates.unbind(2)  # T slices of (D, B, 4, H)
        step_hidden_gates = grad_gates[:, :, :, 1:].flatten(3).unbind(2)  # their slots r, z, n: (D, B, 3H)
        # the saved forward, one step at a time: small slices stay in the cache while a step works on them
        step_reset, step_update = (part.unbind(0) for part in gates.chunk(2, dim=-1))  # T slices of (D, B, H)
        step_candidate, step_hidden_candidate = candidates.unbind(0), hidden_candidates.unbind(0)
        step_previous = states.unbind(0)  # h_0 .. h_T: step t reads h_{t-1} = step_previous[t]
        step_mask = mask.t()[:, None, :, None].unbind(0)  # T slices of (1, B, 1) bool
        # (7): the output at t reaches h_t only on real steps (the output is zero on padding)
        step_output = (grad_outputs * mask[None, :, :, None]).unbind(2)  # T slices of (D, B, H)
        grad_hidden = grad_final_state  # (D, B, H): δh_t, flowing backwards in time
        for t in range(max_length - 1, -1, -1):
            grad_hidden = grad_hidden + step_output[t]  # (7)
            reset, update, candidate = step_reset[t], step_update[t], step_candidate[t]  # (D, B, H) each
            # (8): on padding h_t = h_{t-1}: no gradient reaches a gate there
            step_grad = grad_hidden * step_mask[t]  # (D, B, H)
            slots = step_grad_gates[t]  # (D, B, 4, H): [δa_n (input); δa_r; δa_z; δa_n r (hidden)]
            # (9): δa_n = δh (1-z)(1-n²)
            grad_candidate = torch.mul(step_grad * (1 - update), 1 - candidate * candidate, out=slots[:, :, 0])
            # (11): δa_r = δa_n ĥ r(1-r)
            torch.mul(grad_candidate * step_hidden_candidate[t], reset * (1 - reset), out=slots[:, :, 1])
            # (10): δa_z = δh (h_{t-1} - n) z(1-z)
            torch.mul(step_grad * (step_previous[t] - candidate), update * (1 - update), out=slots[:, :, 2])
            # (12): the hidden projection's n row gets δa_n r
            torch.mul(grad_candidate, reset, out=slots[:, :, 3])
            # (13): δh_{t-1} = δh_t z_t (+ δh_t (1 - m_t) on padding: (8)) + W_hhᵀ δ(W_hh h_{t-1})
            copied = torch.addcmul(grad_hidden - step_grad, step_grad, update)  # (D, B, H)
            grad_hidden = torch.baddbmm(copied, step_hidden_gates[t], weight_hh)  # (D, B, H)
        # (14): the weights' gradients are sums over steps and sentences: one batched product each, after the loop
        flat_gates = grad_gates.view(directions, batch_size * max_length, 4 * size)  # (D, B*T, 4H)
        grad_input_gates = flat_gates[:, :, : 3 * size]  # (D, B*T, 3H): [δa_n; δa_r; δa_z]
        grad_hidden_gates = flat_gates[:, :, size:]  # (D, B*T, 3H): [δa_r; δa_z; δa_n r]
        flat_inputs = inputs.flatten(1, 2)  # (D, B*T, I)
        flat_previous = states[:-1].permute(1, 2, 0, 3).reshape(directions, batch_size * max_length, size)
        # W_ih's rows rotated from [r; z; n] to [n; r; z], the order of the input projection's gradient slots
        weight_ih_nrz = weight_ih.roll(size, dims=1)  # (D, 3H, I)
        grad_inputs = torch.bmm(grad_input_gates, weight_ih_nrz).view(directions, batch_size, max_length, -1)
        # the products below are written transposed ((h δᵀ)ᵀ, not δ hᵀ): the same numbers, a faster memory order
        grad_weight_hh = torch.bmm(flat_previous.transpose(1, 2), grad_hidden_gates).transpose(1, 2)  # (D, 3H, H)
        grad_weight_ih_nrz = torch.bmm(flat_inputs.transpose(1, 2), grad_input_gates).transpose(1, 2)  # (D, 3H, I)
        grad_biases = flat_gates.sum(1)  # (D, 4H): slots [n_in; r; z; n_hidden]
        grad_bias_hh = grad_biases[:, size:]  # (D, 3H)
        grad_bias_ih = grad_biases[:, : 3 * size].roll(-size, dims=1)  # (D, 3H), rows back to r, z, n
        grad_weight_ih = grad_weight_ih_nrz.roll(-size, dims=1)  # (D, 3H, I), rows back to r, z, n
        return grad_inputs, None, grad_hidden, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh


class HandwrittenGRU(nn.Module):
    """torch.nn.GRU written out: same equations, same gate order (r, z, n), same parameter names and shapes.

    Equations (numbered as in the README), for one layer and one direction:
      (1) r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)          reset gate
      (2) z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)          update gate
      (3) n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))     candidate state
      (4) h_t = (1 - z_t) * n_t + z_t * h_{t-1}                         new state
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0,
                 backward="handwritten"):
        super().__init__()
        if backward not in ("handwritten", "autograd"):
            raise ValueError(f"backward must be 'handwritten' or 'autograd', not {backward!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.dropout = bidirectional, dropout
        self.backward = backward  # "handwritten": GRULayerFunction; "autograd": autograd through the same forward
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
        # the reverse direction reads each sentence backwards; reversing inside the length keeps padding at the end
        direction_inputs = [layer_input]
        if self.bidirectional:
            direction_inputs.append(reverse_within_lengths(layer_input, lengths))
        inputs = torch.stack(direction_inputs)  # (D, B, T, I)
        weights = [self.stacked(name, layer) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if self.backward == "handwritten" and torch.is_grad_enabled():
            outputs, final_state = GRULayerFunction.apply(inputs, mask, initial_state, *weights)
        else:  # autograd records every operation of the same forward and differentiates it
            outputs, final_state = gru_layer_forward(inputs, mask, initial_state, *weights)
        direction_outputs = [outputs[0]]  # (B, T, H)
        if self.bidirectional:
            direction_outputs.append(reverse_within_lengths(outputs[1], lengths))  # back to reading order
        return torch.cat(direction_outputs, dim=-1), final_state  # (B, T, D*H), (D, B, H)

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
    backward: str = "handwritten"  # the hand-written GRU's backward: "handwritten" or "autograd"

    def to_dict(self) -> dict:
        """The config as a plain dict (checkpoint-safe)."""
        return asdict(self)


class Tagger(nn.Module):
    """Character embeddings -> bidirectional GRU -> one score per tag and character -> softmax or CRF."""

    def __init__(self, config: TaggerConfig):
        super().__init__()
        if config.output not in ("crf", "softmax") or config.impl not in GRU_IMPLEMENTATIONS:
            raise ValueError(f"unknown output {config.output!r} or impl {config.impl!r}")
        gru_options = {"backward": config.backward} if config.impl == "handwritten" else {}
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        self.gru = GRU_IMPLEMENTATIONS[config.impl](
            config.embedding_dim, config.hidden_size, config.num_layers, bidirectional=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,  # between stacked layers only
            **gru_options,
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
