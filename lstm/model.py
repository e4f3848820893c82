"""A multi-layer LSTM written by hand, torch.nn.LSTM beside it, a tanh RNN baseline, and the two models built on them.

Read top to bottom: the hand-written LSTM (equations 1-6 of the README), then `make_recurrent` which picks
an implementation behind one interface, then the character language model and the adding-problem regressor.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class HandwrittenLSTM(nn.Module):
    """A batch-first multi-layer LSTM with torch.nn.LSTM's parameter names, shapes and gate order (i, f, g, o)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size
            # The four gates' weights are stacked along the first axis in torch's order: input, forget, cell, output.
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, layer_input_size)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise as torch.nn.LSTM does: every parameter uniform in (-1/sqrt(H), 1/sqrt(H)), in the same order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, inputs, state=None, lengths=None):
        """Run all layers over (B, T, input_size); return outputs (B, T, H) and the final (h, c), each (L, B, H)."""
        batch_size, steps, _ = inputs.shape
        if state is None:
            zeros = inputs.new_zeros(self.num_layers, batch_size, self.hidden_size)  # (L, B, H)
            state = (zeros, zeros)
        # valid[b, t] is True while step t is inside sequence b; past its end the state is frozen, the output zero.
        valid = None
        if lengths is not None:
            positions = torch.arange(steps, device=inputs.device)  # (T,)
            valid = (positions[None, :] < lengths.to(inputs.device)[:, None]).unsqueeze(-1)  # (B, T, 1)
        layer_input = inputs
        final_hidden, final_cell = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
            layer_output, (hidden, cell) = self._run_layer(layer, layer_input, state[0][layer], state[1][layer], valid)
            final_hidden.append(hidden)
            final_cell.append(cell)
            layer_input = layer_output
        return layer_input, (torch.stack(final_hidden), torch.stack(final_cell))

    def _run_layer(self, layer, layer_input, hidden, cell, valid):
        """One layer through time: the input projection for all steps at once, then the recurrence step by step."""
        weight_ih, weight_hh = getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")
        bias = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")  # (4H,)
        # W_ih x_t + b for every t in one matrix product, hoisted out of the time loop.
        input_projection = torch.matmul(layer_input, weight_ih.t()) + bias  # (B, T, 4H)
        weight_hh_t = weight_hh.t()  # (H, 4H)
        outputs = []
        # unbind, not input_projection[:, t]: its backward stacks once instead of writing T full-size zero tensors.
        for t, projection_t in enumerate(input_projection.unbind(dim=1)):  # each (B, 4H)
            # All four gates' pre-activations in one matrix product: eq. (1)-(4) before their nonlinearities.
            gates = torch.addmm(projection_t, hidden, weight_hh_t)  # (B, 4H)
            input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)  # each (B, H)
            input_gate = torch.sigmoid(input_gate)  # eq. (1): how much of the candidate to write
            forget_gate = torch.sigmoid(forget_gate)  # eq. (2): how much of the old cell to keep
            candidate = torch.tanh(candidate)  # eq. (3): what could be written
            output_gate = torch.sigmoid(output_gate)  # eq. (4): how much of the cell to show
            # Forget, then write: the cell state is a gated sum, the "constant error carousel". Eq. (5)
            new_cell = forget_gate * cell + input_gate * candidate  # (B, H)
            # Output: the hidden state is a gated, squashed view of the cell. Eq. (6)
            new_hidden = output_gate * torch.tanh(new_cell)  # (B, H)
            if valid is not None:
                step_valid = valid[:, t]  # (B, 1)
                cell = torch.where(step_valid, new_cell, cell)
                hidden = torch.where(step_valid, new_hidden, hidden)
                outputs.append(new_hidden * step_valid)
            else:
                cell, hidden = new_cell, new_hidden
                outputs.append(new_hidden)
        return torch.stack(outputs, dim=1), (hidden, cell)  # (B, T, H), ((B, H), (B, H))


class TorchRecurrent(nn.Module):
    """torch.nn.LSTM or torch.nn.RNN (tanh) behind the hand-written LSTM's interface, packing variable lengths."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        module = nn.LSTM if cell == "lstm" else nn.RNN
        self.recurrent = module(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)

    def forward(self, inputs, state=None, lengths=None):
        """Same contract as HandwrittenLSTM.forward (the state of an RNN is h alone, (L, B, H))."""
        if lengths is None:
            return self.recurrent(inputs, state)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, state = self.recurrent(packed, state)
        outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=inputs.shape[1])
        return outputs, state  # (B, T, H)


def make_recurrent(cell: str, impl: str, input_size: int, hidden_size: int, num_layers: int, dropout: float):
    """The recurrent core: the hand-written LSTM, torch.nn.LSTM, or the torch.nn.RNN baseline."""
    if cell == "lstm" and impl == "handwritten":
        return HandwrittenLSTM(input_size, hidden_size, num_layers, dropout)
    if cell in ("lstm", "rnn") and impl in ("handwritten", "torch"):
        return TorchRecurrent(cell, input_size, hidden_size, num_layers, dropout)
    raise ValueError(f"unknown cell {cell!r} or impl {impl!r}")


def recurrent_parameter_count(cell: str, input_size: int, hidden_size: int, num_layers: int) -> int:
    """Parameters of the recurrent core alone: 4 gates for an LSTM, 1 for an RNN."""
    gates = 4 if cell == "lstm" else 1
    first = gates * hidden_size * (input_size + hidden_size + 2)
    return first + (num_layers - 1) * gates * hidden_size * (2 * hidden_size + 2)


def matching_rnn_hidden_size(lstm_hidden_size: int, input_size: int, num_layers: int, extra_per_hidden: int = 0) -> int:
    """The RNN hidden size whose model has about as many parameters as an LSTM model of lstm_hidden_size."""

    def total(cell, hidden):
        return recurrent_parameter_count(cell, input_size, hidden, num_layers) + extra_per_hidden * hidden

    target = total("lstm", lstm_hidden_size)
    return min(range(1, 8 * lstm_hidden_size), key=lambda hidden: abs(total("rnn", hidden) - target))


@torch.no_grad()
def open_forget_gates(recurrent: nn.Module, hidden_size: int, bias: float = 1.0):
    """Start every forget gate near sigma(1) = 0.73 instead of sigma(0) = 0.5 (Jozefowicz et al., 2015).

    Works on the hand-written LSTM and on torch.nn.LSTM alike: both name their biases bias_ih_l{k} / bias_hh_l{k}
    and keep the forget gate in rows H..2H. b_ih's slice is set to `bias` and b_hh's to 0, so their sum is `bias`.
    With f = 0.5 the cell keeps half of itself per step (0.5^20 ~ 1e-6 after 20 characters); with 0.73 gradients
    through the cell reach back several times further from the first step of training.
    """
    for name, parameter in recurrent.named_parameters():
        if name.rsplit(".", 1)[-1].startswith(("bias_ih_l", "bias_hh_l")):
            parameter[hidden_size : 2 * hidden_size] = bias if "bias_ih" in name else 0.0


@dataclass
class CharConfig:
    """The character language model's shape (saved in checkpoints as a dict)."""

    vocab_size: int = 96
    embedding_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    cell: str = "lstm"  # lstm | rnn
    impl: str = "handwritten"  # handwritten | torch (the rnn baseline is always torch.nn.RNN)


class CharLanguageModel(nn.Module):
    """Embedding -> recurrent core -> linear read-out of the next character's logits."""

    def __init__(self, config: CharConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.recurrent = make_recurrent(
            config.cell, config.impl, config.embedding_size, config.hidden_size, config.num_layers, config.dropout
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.cell == "lstm":
            open_forget_gates(self.recurrent, config.hidden_size)

    def forward(self, tokens, state=None, lengths=None):
        """Logits (B, T, V) for the character after each input character, and the state to carry on."""
        embedded = self.embedding(tokens)  # (B, T, E)
        outputs, state = self.recurrent(embedded, state, lengths)  # (B, T, H)
        return self.head(self.dropout(outputs)), state  # (B, T, V)

    def config_dict(self) -> dict:
        """The config as a plain dict, for checkpoints."""
        return asdict(self.config)


def detach_state(state):
    """Cut the graph behind a carried state (truncated backprop through time): h, or the pair (h, c)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(part.detach() for part in state)
    return state.detach()


@torch.no_grad()
def generate(model: CharLanguageModel, prompt_tokens: list[int], length: int, temperature: float, generator=None):
    """Yield `length` sampled token ids one at a time, carrying the recurrent state from step to step."""
    device = next(model.parameters()).device
    model.eval()
    tokens = torch.tensor([prompt_tokens], device=device)  # (1, P)
    logits, state = model(tokens)  # the whole prompt once, keeping its final state
    for _ in range(length):
        probabilities = torch.softmax(logits[0, -1] / temperature, dim=-1)  # (V,)
        next_token = torch.multinomial(probabilities.cpu(), 1, generator=generator).item()
        yield next_token
        logits, state = model(torch.tensor([[next_token]], device=device), state)  # one step, state carried


@dataclass
class AddingConfig:
    """The adding-problem regressor's shape."""

    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"
    impl: str = "handwritten"
    forget_bias: float = 0.0  # LSTM only: the forget gates' starting bias (0 gives sigma(0) = 0.5)

    @classmethod
    def from_checkpoint(cls, stored: dict) -> "AddingConfig":
        """The config saved in an adding checkpoint; fields the checkpoint predates take their defaults."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in stored.items() if key in names})


class AddingModel(nn.Module):
    """Reads (value, marker) pairs and predicts the sum of the two marked values from the last hidden state."""

    def __init__(self, config: AddingConfig):
        super().__init__()
        self.config = config
        self.recurrent = make_recurrent(config.cell, config.impl, 2, config.hidden_size, config.num_layers, 0.0)
        self.head = nn.Linear(config.hidden_size, 1)
        if config.cell == "lstm" and config.forget_bias:
            open_forget_gates(self.recurrent, config.hidden_size, config.forget_bias)

    def forward(self, inputs):
        """Predicted sums (B,) for inputs (B, T, 2)."""
        outputs, _ = self.recurrent(inputs)  # (B, T, H)
        return self.head(outputs[:, -1]).squeeze(-1)  # (B,)
