"""A multi-layer LSTM written by hand, torch.nn.LSTM beside it, a tanh RNN baseline, and the two models built on them.

Read top to bottom: one layer's forward (equations 1-6 of the README), the same layer with its backward written
out (9-11), the multi-layer LSTM, `make_recurrent` which picks an implementation, then the two models built on them.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def run_lstm_layer(inputs, valid, hidden, cell, weight_ih, weight_hh, bias_ih, bias_hh, record=None):
    """Equations (1)-(6) for one layer over (B, T, I): outputs (B, T, H) and the final (h, c), each (B, H).

    The same code runs under autograd (`--backward autograd`) and inside LSTMLayerFunction's forward, which passes a
    list as `record` to keep, for every step, what the hand-written backward needs: the four gates, tanh(c_t), and
    the states h_{t-1}, c_{t-1} the step started from. `valid` (B, T, 1) is True while step t is inside sequence b.
    """
    # W_ih x_t + b for every t in one matrix product, hoisted out of the time loop.
    input_projection = torch.matmul(inputs, weight_ih.t()) + (bias_ih + bias_hh)  # (B, T, 4H)
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
        squashed_cell = torch.tanh(new_cell)  # (B, H)
        new_hidden = output_gate * squashed_cell  # (B, H)
        if record is not None:
            record.append((input_gate, forget_gate, candidate, output_gate, squashed_cell, hidden, cell))
        if valid is not None:  # past a sequence's end the state is frozen and the output zero
            step_valid = valid[:, t]  # (B, 1)
            cell = torch.where(step_valid, new_cell, cell)
            hidden = torch.where(step_valid, new_hidden, hidden)
            outputs.append(new_hidden * step_valid)
        else:
            cell, hidden = new_cell, new_hidden
            outputs.append(new_hidden)
    return torch.stack(outputs, dim=1), hidden, cell  # (B, T, H), (B, H), (B, H)


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer through time with a hand-written backward: equations (9)-(11) of the README."""

    @staticmethod
    def forward(ctx, inputs, valid, hidden, cell, weight_ih, weight_hh, bias_ih, bias_hh):
        """run_lstm_layer without a graph; keeps each step's gates, tanh(c_t) and start states for the backward."""
        record = []
        outputs, final_hidden, final_cell = run_lstm_layer(
            inputs, valid, hidden, cell, weight_ih, weight_hh, bias_ih, bias_hh, record
        )
        time_valid = None if valid is None else valid.transpose(0, 1).to(inputs.dtype)  # (T, B, 1), 1 or 0
        ctx.steps = len(record)
        # Seven (B, H) tensors per step, kept as they are: i, f, g, o, tanh(c_t), h_{t-1}, c_{t-1}.
        ctx.save_for_backward(inputs, time_valid, weight_ih, weight_hh, *(kept for step in record for kept in step))
        return outputs, final_hidden, final_cell

    @staticmethod
    def backward(ctx, grad_outputs, grad_final_hidden, grad_final_cell):
        """From the last step to the first: (9) the cell's gradient, (10) the gates', (11) the weights' and inputs'."""
        inputs, time_valid, weight_ih, weight_hh, *kept = ctx.saved_tensors
        steps, (batch_size, hidden_size) = ctx.steps, kept[0].shape
        grad_outputs = grad_outputs.transpose(0, 1)  # (T, B, H)
        if time_valid is not None:
            grad_outputs = grad_outputs * time_valid  # an output on padding is a constant zero
        grad_gates = grad_outputs.new_empty(steps, batch_size, 4 * hidden_size)  # (T, B, 4H): δz_t, from the end
        grad_hidden, grad_cell = grad_final_hidden, grad_final_cell  # (B, H) each: δh and δc, flowing back in time
        for t in range(steps - 1, -1, -1):
            input_gate, forget_gate, candidate, output_gate, squashed_cell, _, previous_cell = kept[7 * t : 7 * t + 7]
            grad_hidden = grad_hidden + grad_outputs[t]  # δh_t: from the output at t and from step t+1, (11)
            if time_valid is not None:  # past a sequence's end the state was copied: its gradient passes back as is
                passed_hidden, passed_cell = grad_hidden * (1 - time_valid[t]), grad_cell * (1 - time_valid[t])
                grad_hidden, grad_cell = grad_hidden * time_valid[t], grad_cell * time_valid[t]
            # (9): δc_t = δh_t ⊙ o_t ⊙ (1 - tanh²c_t) + δc_{t+1} ⊙ f_{t+1} (the second term came from step t+1)
            grad_cell = torch.addcmul(grad_cell, grad_hidden * output_gate, 1 - squashed_cell * squashed_cell)
            # (10): the gate pre-activations, each written into its block of δz_t; i, f, g through c_t, o through h_t
            for_input, for_forget, for_candidate, for_output = grad_gates[t].chunk(4, dim=1)  # each (B, H)
            torch.mul(grad_cell * candidate, input_gate * (1 - input_gate), out=for_input)
            torch.mul(grad_cell * previous_cell, forget_gate * (1 - forget_gate), out=for_forget)
            torch.mul(grad_cell * input_gate, 1 - candidate * candidate, out=for_candidate)
            torch.mul(grad_hidden * squashed_cell, output_gate * (1 - output_gate), out=for_output)
            # (11): back to step t-1, through W_hh to h_{t-1} and along the cell to c_{t-1}
            grad_hidden = torch.mm(grad_gates[t], weight_hh)  # (B, H)
            grad_cell = grad_cell * forget_gate  # (B, H)
            if time_valid is not None:
                grad_hidden, grad_cell = grad_hidden + passed_hidden, grad_cell + passed_cell
        # (11): the weights' gradients are sums over time, so each leaves the loop as one matrix product.
        flat_grad_gates = grad_gates.view(steps * batch_size, 4 * hidden_size)  # (T*B, 4H)
        previous_hidden = torch.stack(kept[5::7]).view(steps * batch_size, hidden_size)  # h_{t-1} for every t
        grad_weight_hh = flat_grad_gates.t() @ previous_hidden  # (4H, H)
        flat_inputs = inputs.transpose(0, 1).reshape(steps * batch_size, -1)  # (T*B, I)
        grad_weight_ih = flat_grad_gates.t() @ flat_inputs  # (4H, I)
        grad_bias = flat_grad_gates.sum(0)  # (4H,): the same for b_ih and b_hh
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            grad_inputs = (flat_grad_gates @ weight_ih).view(steps, batch_size, -1).transpose(0, 1)  # (B, T, I)
        return grad_inputs, None, grad_hidden, grad_cell, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias


class HandwrittenLSTM(nn.Module):
    """A batch-first multi-layer LSTM with torch.nn.LSTM's parameter names, shapes and gate order (i, f, g, o).

    backward="handwritten" differentiates each layer with LSTMLayerFunction; "autograd" lets autograd record
    run_lstm_layer step by step, the same forward code, for comparison.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 backward: str = "handwritten"):
        super().__init__()
        if backward not in ("handwritten", "autograd"):
            raise ValueError(f"unknown backward {backward!r} (handwritten or autograd)")
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        self.backward = backward
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
            weights = [getattr(self, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            # Without a graph to build (evaluation, sampling) both are the same forward code: run it as it is.
            handwritten = self.backward == "handwritten" and torch.is_grad_enabled()
            run = LSTMLayerFunction.apply if handwritten else run_lstm_layer
            layer_input, hidden, cell = run(layer_input, valid, state[0][layer], state[1][layer], *weights)
            final_hidden.append(hidden)
            final_cell.append(cell)
        return layer_input, (torch.stack(final_hidden), torch.stack(final_cell))


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


def make_recurrent(cell: str, impl: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                   backward: str = "handwritten"):
    """The recurrent core: the hand-written LSTM (with its own backward, or autograd's), torch.nn.LSTM, or the
    torch.nn.RNN baseline."""
    if cell == "lstm" and impl == "handwritten":
        return HandwrittenLSTM(input_size, hidden_size, num_layers, dropout, backward)
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

    def __init__(self, config: CharConfig, backward: str = "handwritten"):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.recurrent = make_recurrent(config.cell, config.impl, config.embedding_size, config.hidden_size,
                                        config.num_layers, config.dropout, backward)
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

    def __init__(self, config: AddingConfig, backward: str = "handwritten"):
        super().__init__()
        self.config = config
        self.recurrent = make_recurrent(config.cell, config.impl, 2, config.hidden_size, config.num_layers, 0.0,
                                        backward)
        self.head = nn.Linear(config.hidden_size, 1)
        if config.cell == "lstm" and config.forget_bias:
            open_forget_gates(self.recurrent, config.hidden_size, config.forget_bias)

    def forward(self, inputs):
        """Predicted sums (B,) for inputs (B, T, 2)."""
        outputs, _ = self.recurrent(inputs)  # (B, T, H)
        return self.head(outputs[:, -1]).squeeze(-1)  # (B,)
