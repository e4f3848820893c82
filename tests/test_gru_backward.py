"""The GRU's hand-written backward (GRULayerFunction): gradcheck, and equality with torch.nn.GRU and with autograd."""

import pytest
import torch
from torch.func import functional_call

from gru.model import GRULayerFunction, HandwrittenGRU, TorchGRU, gru_layer_forward, lengths_to_mask

LENGTHS = torch.tensor([6, 2, 4])  # uneven: three sentences of a batch padded to 6 characters

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.mark.parametrize("with_initial_state", [True, False])
def test_gru_layer_function_passes_gradcheck_in_float64(with_initial_state):
    gru = HandwrittenGRU(5, 7, num_layers=2, bidirectional=True).double()
    names = [name for name, _ in gru.named_parameters()]
    inputs = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)  # (B, T, I)
    initial_state = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)  # (L*D, B, H)

    def run(inputs, initial_state, *parameters):
        outputs, final_state = functional_call(
            gru, dict(zip(names, parameters)), (inputs, LENGTHS, initial_state if with_initial_state else None)
        )
        return outputs, final_state

    parameters = [parameter.detach().clone().requires_grad_() for parameter in gru.parameters()]
    # fast mode: random projections u, v of the whole Jacobian J, numerical v·J·u against analytical (J^T v)·u
    assert torch.autograd.gradcheck(run, (inputs, initial_state, *parameters), fast_mode=True)


def test_gru_layer_function_passes_full_gradcheck_in_float64():
    inputs = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)  # (D, B, T, I), both directions
    mask = lengths_to_mask(LENGTHS, 6)  # (B, T)
    initial_state = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)  # (D, B, H)
    weights = [0.5 * torch.randn(shape, dtype=torch.float64) for shape in [(2, 21, 5), (2, 21, 7), (2, 21), (2, 21)]]
    weights = [weight.requires_grad_() for weight in weights]
    # every entry of the Jacobian, numerical against analytical
    assert torch.autograd.gradcheck(GRULayerFunction.apply, (inputs, mask, initial_state, *weights))


def test_gru_layer_function_is_what_trains_and_saves_only_its_backward_inputs():
    inputs = torch.randn(2, 3, 6, 5, requires_grad=True)  # (D, B, T, I)
    mask = lengths_to_mask(LENGTHS, 6)
    weights = [torch.randn(2, 21, 5), torch.randn(2, 21, 7), torch.randn(2, 21), torch.randn(2, 21)]
    outputs, final_state = GRULayerFunction.apply(inputs, mask, torch.zeros(2, 3, 7), *weights)
    assert outputs.grad_fn.name() == "GRULayerFunctionBackward"
    saved_shapes = [tuple(saved.shape) for saved in outputs.grad_fn.saved_tensors]
    # inputs, mask, two weights, the states h_0..h_T, gates r and z, candidates n, hidden candidate projections
    assert saved_shapes == [(2, 3, 6, 5), (3, 6), (2, 21, 5), (2, 21, 7), (7, 2, 3, 7), (6, 2, 3, 14),
                            (6, 2, 3, 7), (6, 2, 3, 7)]
    outputs, _ = HandwrittenGRU(5, 7, bidirectional=True)(torch.randn(3, 6, 5), LENGTHS)
    assert "GRULayerFunctionBackward" in backward_node_names(outputs.grad_fn)  # the default module uses it
    outputs, _ = HandwrittenGRU(5, 7, bidirectional=True, backward="autograd")(torch.randn(3, 6, 5), LENGTHS)
    assert "GRULayerFunctionBackward" not in backward_node_names(outputs.grad_fn)


def backward_node_names(node) -> set[str]:
    """Names of every node of an autograd graph."""
    names, waiting, seen = set(), [node], set()
    while waiting:
        node = waiting.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        waiting += [child for child, _ in node.next_functions]
    return names


def gradients_of(module, inputs, initial_state, dtype):
    """Outputs, final state and the gradients of a fixed loss w.r.t. inputs, initial state and every parameter."""
    leaf_inputs = inputs.to(dtype).requires_grad_()
    leaf_state = None if initial_state is None else initial_state.to(dtype).requires_grad_()
    outputs, final_state = module.to(dtype)(leaf_inputs, LENGTHS, leaf_state)
    loss = (outputs * torch.linspace(-1, 1, outputs.shape[-1], dtype=dtype)).pow(2).sum() + final_state.pow(3).sum()
    leaves = [leaf_inputs, *([] if leaf_state is None else [leaf_state]), *module.parameters()]
    return [outputs, final_state, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("num_layers,bidirectional,with_initial_state",
                         [(1, False, True), (2, True, True), (2, True, False)])
def test_handwritten_backward_equals_torch_gru(dtype, tolerance, num_layers, bidirectional, with_initial_state):
    reference = TorchGRU(5, 7, num_layers, bidirectional)
    handwritten = HandwrittenGRU(5, 7, num_layers, bidirectional)
    handwritten.load_state_dict(reference.state_dict())
    inputs = torch.randn(3, 6, 5, dtype=torch.float64)
    initial_state = torch.randn(num_layers * (1 + bidirectional), 3, 7, dtype=torch.float64)
    initial_state = initial_state if with_initial_state else None
    expected = gradients_of(reference, inputs, initial_state, dtype)
    found = gradients_of(handwritten, inputs, initial_state, dtype)
    assert len(found) == len(expected) == 2 + (1 + with_initial_state) + 4 * num_layers * (1 + bidirectional)
    for got, want in zip(found, expected):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_handwritten_backward_equals_autograd_through_the_same_forward():
    handwritten = HandwrittenGRU(5, 7, 2, bidirectional=True).double()
    through_autograd = HandwrittenGRU(5, 7, 2, bidirectional=True, backward="autograd").double()
    through_autograd.load_state_dict(handwritten.state_dict())
    inputs, initial_state = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(4, 3, 7, dtype=torch.float64)
    for got, want in zip(gradients_of(handwritten, inputs, initial_state, torch.float64),
                         gradients_of(through_autograd, inputs, initial_state, torch.float64)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_padding_gets_no_gradient_and_passes_the_state_gradient_through():
    inputs = torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)  # (D, B, T, I)
    weights = [torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True),
               torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)]
    mask = lengths_to_mask(torch.tensor([2]), 4)  # two real steps, two of padding
    state = torch.randn(1, 1, 2, dtype=torch.float64, requires_grad=True)
    _, final_state = GRULayerFunction.apply(inputs, mask, state, *weights)
    _, short_final = gru_layer_forward(inputs[:, :, :2], mask[:, :2], state, *weights)
    torch.testing.assert_close(final_state, short_final)
    grad_inputs, grad_state = torch.autograd.grad(final_state.sum(), [inputs, state])
    assert grad_inputs[:, :, 2:].abs().max() == 0  # padding never moves a result, so it gets no gradient
    expected_inputs, expected_state = torch.autograd.grad(short_final.sum(), [inputs, state])
    torch.testing.assert_close(grad_state, expected_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_inputs, expected_inputs, rtol=1e-12, atol=1e-12)
