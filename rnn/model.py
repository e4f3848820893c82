"""An Elman RNN written by hand: forward loop over time, backpropagation through time, classifier.

Equations (numbered as in rnn/README.md):
    (1) a_t = x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh        pre-activation
    (2) c_t = tanh(a_t)                                       candidate state
    (3) h_t = m_t c_t + (1 - m_t) h_{t-1}                     mask m_t = 1 on real steps, 0 on padding
    (4) y_t = m_t h_t                                         output (zero on padding, like torch's packed RNN)
Backward (derived in the README), walking from the last step to the first with δh = ∂L/∂h_t:
    (5) δh ← δh + m_t ∂L/∂y_t
    (6) δa_t = m_t δh ⊙ (1 - c_t²)
    (7) ∂L/∂h_{t-1} = (1 - m_t) δh + δa_t W_hh
    (8) ∂L/∂W_hh = Σ_t δa_tᵀ h_{t-1},  ∂L/∂W_ih = Σ_t δa_tᵀ x_t,  ∂L/∂b_ih = ∂L/∂b_hh = Σ_t δa_t,  ∂L/∂x_t = δa_t W_ih
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class RNNLayerFunction(torch.autograd.Function):
    """One direction of one tanh RNN layer, with a hand-written backward (backpropagation through time)."""

    @staticmethod
    def forward(ctx, inputs, mask, initial_hidden, weight_ih, weight_hh, bias_ih, bias_hh, reverse):
        """Run equations (1)-(4) over time; return all outputs (B, T, H) and the final hidden state (B, H)."""
        batch_size, steps, _ = inputs.shape
        # Hoisted input projection: one big matmul for every time step at once, time-major for contiguous slices.
        input_projection = torch.addmm(bias_ih + bias_hh, inputs.reshape(batch_size * steps, -1), weight_ih.t())
        input_projection = input_projection.view(batch_size, steps, -1).transpose(0, 1).contiguous()  # (T, B, H)
        time_mask = None if mask is None else mask.t().unsqueeze(-1).contiguous()  # (T, B, 1) bool
        weight_hh_t = weight_hh.t()  # (H, H)
        hidden_state = initial_hidden  # (B, H)
        previous_states = torch.empty_like(input_projection)  # (T, B, H): h_{t-1} for each t
        candidates = torch.empty_like(input_projection)  # (T, B, H): c_t for each t
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            previous_states[t] = hidden_state
            # (1)+(2): candidate state from the input at t and the state carried from the step before.
            candidate = torch.tanh(torch.addmm(input_projection[t], hidden_state, weight_hh_t))  # (B, H)
            candidates[t] = candidate
            # (3): on padding the state passes through unchanged.
            hidden_state = candidate if time_mask is None else torch.where(time_mask[t], candidate, hidden_state)
        # (4): outputs are the candidates on real steps and zero on padding.
        outputs = candidates if time_mask is None else candidates * time_mask  # (T, B, H)
        ctx.save_for_backward(inputs, mask, weight_ih, weight_hh, previous_states, candidates)
        ctx.reverse = reverse
        return outputs.transpose(0, 1).contiguous(), hidden_state

    @staticmethod
    def backward(ctx, grad_outputs, grad_final_hidden):
        """Walk the sequence in reverse order of the forward pass, equations (5)-(8)."""
        inputs, mask, weight_ih, weight_hh, previous_states, candidates = ctx.saved_tensors
        steps, batch_size, hidden_size = candidates.shape
        grad_outputs = grad_outputs.transpose(0, 1)  # (T, B, H)
        time_mask = None if mask is None else mask.t().unsqueeze(-1)  # (T, B, 1) bool
        # (2)': derivative of tanh, computed for every step at once.
        tanh_derivative = 1 - candidates * candidates  # (T, B, H)
        grad_pre_activations = torch.empty_like(candidates)  # (T, B, H): δa_t
        grad_hidden = grad_final_hidden  # (B, H): δh, flowing backwards in time
        order = range(steps) if ctx.reverse else range(steps - 1, -1, -1)
        for t in order:
            if time_mask is None:
                grad_hidden = grad_hidden + grad_outputs[t]  # (5)
                grad_pre_activations[t] = grad_hidden * tanh_derivative[t]  # (6)
                grad_hidden = grad_pre_activations[t] @ weight_hh  # (7)
            else:
                grad_hidden = grad_hidden + grad_outputs[t] * time_mask[t]  # (5)
                grad_pre_activations[t] = grad_hidden * tanh_derivative[t] * time_mask[t]  # (6)
                grad_hidden = torch.addmm(torch.where(time_mask[t], 0, grad_hidden), grad_pre_activations[t], weight_hh)
        # (8): the weight gradients are sums over time, so they leave the loop as single matmuls.
        flat_grad = grad_pre_activations.reshape(steps * batch_size, hidden_size)  # (T*B, H)
        grad_weight_hh = flat_grad.t() @ previous_states.reshape(steps * batch_size, hidden_size)  # (H, H)
        flat_inputs = inputs.transpose(0, 1).reshape(steps * batch_size, -1)  # (T*B, I)
        grad_weight_ih = flat_grad.t() @ flat_inputs  # (H, I)
        grad_bias = flat_grad.sum(0)  # (H,)
        grad_inputs = (flat_grad @ weight_ih).view(steps, batch_size, -1).transpose(0, 1)  # (B, T, I)
        return grad_inputs, None, grad_hidden, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias, None


def mask_from_lengths(lengths, steps):
    """A (B, T) bool mask, True on the first `lengths[b]` steps of each sequence."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


class HandwrittenRNN(nn.Module):
    """A multi-layer, optionally bidirectional tanh RNN with torch.nn.RNN's parameter names and shapes."""

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.num_directions = 2 if bidirectional else 1
        self.dropout = dropout
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes(layer):
                # Same order as torch.nn.RNN, so the same seed gives the same initial weights.
                self.register_parameter(f"weight_ih{suffix}", nn.Parameter(torch.empty(hidden_size, layer_input)))
                self.register_parameter(f"weight_hh{suffix}", nn.Parameter(torch.empty(hidden_size, hidden_size)))
                self.register_parameter(f"bias_ih{suffix}", nn.Parameter(torch.empty(hidden_size)))
                self.register_parameter(f"bias_hh{suffix}", nn.Parameter(torch.empty(hidden_size)))
        self.reset_parameters()

    def _suffixes(self, layer):
        """Parameter-name suffixes of one layer: `_l0`, and `_l0_reverse` when bidirectional."""
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.num_directions == 2 else [])

    def reset_parameters(self):
        """Uniform in ±1/sqrt(hidden_size), as torch.nn.RNN does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, inputs, lengths=None, initial_hidden=None):
        """inputs (B, T, I), lengths (B,) -> outputs (B, T, D*H) zero on padding, final hidden (L*D, B, H)."""
        batch_size, steps, _ = inputs.shape
        mask = None if lengths is None else mask_from_lengths(lengths.to(inputs.device), steps)  # (B, T)
        if initial_hidden is None:
            initial_hidden = inputs.new_zeros(self.num_layers * self.num_directions, batch_size, self.hidden_size)
        layer_input, final_states = inputs, []
        for layer in range(self.num_layers):
            direction_outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                weights = [getattr(self, f"{name}{suffix}") for name in names]
                outputs, final = RNNLayerFunction.apply(
                    layer_input, mask, initial_hidden[layer * self.num_directions + direction], *weights, direction == 1
                )
                direction_outputs.append(outputs)  # (B, T, H)
                final_states.append(final)  # (B, H)
            layer_input = torch.cat(direction_outputs, dim=-1)  # (B, T, D*H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(final_states)  # (B, T, D*H), (L*D, B, H)


class TorchRNN(nn.RNN):
    """torch.nn.RNN behind the same interface (and the same state_dict keys) as HandwrittenRNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, nonlinearity="tanh", batch_first=True,
                         bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, inputs, lengths=None, initial_hidden=None):
        """inputs (B, T, I), lengths (B,) -> outputs (B, T, D*H) zero on padding, final hidden (L*D, B, H)."""
        if lengths is None:
            return super().forward(inputs, initial_hidden)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, final_hidden = super().forward(packed, initial_hidden)
        outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=inputs.shape[1])
        return outputs, final_hidden


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a NameClassifier; stored in checkpoints as a dict."""

    vocab_size: int
    num_classes: int
    embedding_size: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    impl: str = "handwritten"

    def to_dict(self):
        """The config as a plain dict (safe for weights_only checkpoints)."""
        return asdict(self)


class NameClassifier(nn.Module):
    """Characters -> embedding -> RNN -> final hidden states of the top layer -> language logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=0)
        rnn_class = {"handwritten": HandwrittenRNN, "torch": TorchRNN}[config.impl]
        self.rnn = rnn_class(config.embedding_size, config.hidden_size, config.num_layers,
                             config.bidirectional, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        directions = 2 if config.bidirectional else 1
        self.head = nn.Linear(directions * config.hidden_size, config.num_classes)

    def forward(self, character_ids, lengths):
        """character_ids (B, T) padded with 0, lengths (B,) -> logits (B, num_classes)."""
        embedded = self.dropout(self.embedding(character_ids))  # (B, T, E)
        _, final_hidden = self.rnn(embedded, lengths)  # (L*D, B, H)
        directions = 2 if self.config.bidirectional else 1
        # The forward direction's state after the last character, the reverse one's after the first.
        top_layer = final_hidden[-directions:]  # (D, B, H)
        summary = torch.cat(list(top_layer), dim=-1)  # (B, D*H)
        return self.head(self.dropout(summary))  # (B, C)


def clip_gradient_norm(parameters, max_norm):
    """Scale all gradients together so that their joint L2 norm is at most max_norm; return the norm before."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in gradients))
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for gradient in gradients:
        gradient.mul_(scale)
    return total_norm
