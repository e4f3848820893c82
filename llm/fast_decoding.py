"""Weights laid out for generating one token at a time, where reading memory, not arithmetic, sets the pace.

    prepare_for_decoding(model)      # once, after loading: the same model, the same equations, faster steps

Generating a token multiplies one vector by every weight matrix of the model: each weight is read from memory once
and used for one multiply-add, so a step takes about as long as streaming all the weights through the processor.
How close a kernel gets to the memory's speed depends on how the matrix lies in memory, and the best layout depends
on the kernel, the precision, the shape and the machine. So this module measures, once per matrix shape, how fast
y = x W^T runs for one token with W stored three ways, and keeps the fastest:

- as it is: W row by row (PyTorch's default for an (out, in) matrix);
- column by column: the same (out, in) matrix whose transpose W^T is stored row by row;
- packed: W reordered into the tiles that oneDNN's matrix kernels read (with avx512_bf16 or AMX these multiply
  bfloat16 pairs in one instruction), where PyTorch was built with oneDNN.

The matrices keep their values and the model computes the same equations; only the order of the bytes changes
(and with it the order in which a kernel adds up products, so float32 results can differ in the last bits).
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model import Llama


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored column by column: its transpose W^T is contiguous."""
    return weight.t().contiguous().t()


def packing_available(dtype: torch.dtype) -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and dtype in (torch.float32, torch.bfloat16))


class PackedLinear(nn.Module):
    """y = x W^T (no bias) with W reordered once into oneDNN's tiles."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (tokens, in)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")  # (tokens, out)
        return y.view(*x.shape[:-1], self.out_features)


def seconds_per_call(layer, x: torch.Tensor, calls: int = 20) -> float:
    """The best of three timings of `calls` calls."""
    layer(x)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


@torch.inference_mode()
def fastest_layout(weight: torch.Tensor) -> str:
    """"row", "column" or "packed": the layout of `weight` in which one token's x W^T runs fastest here."""
    x = torch.randn(1, weight.size(1), dtype=weight.dtype, device=weight.device)  # one token
    column = column_major(weight)
    ways = {"row": lambda v: F.linear(v, weight), "column": lambda v: F.linear(v, column)}
    if weight.device.type == "cpu" and packing_available(weight.dtype):
        ways["packed"] = PackedLinear(weight)
    times = {name: seconds_per_call(layer, x) for name, layer in ways.items()}
    return min(times, key=times.get)


def prepare_for_decoding(model: Llama, choose=None) -> dict:
    """Lay out every linear layer's weight (and the tied output matrix) the fastest way; return the choices.

    choose(weight) -> "row" | "column" | "packed" overrides the measurement (the tests force each layout).

    Packed layers replace their nn.Linear (they hold no trainable weight any more: for generating only). A tied
    embedding matrix is read both as a table of rows and as the output projection: packed, the output projection
    becomes a packed copy of it (vocab x d more memory); column by column, the one matrix serves both.
    """
    choices, by_shape = {}, {}
    parents = [(name, module) for name, module in model.named_modules() if not isinstance(module, nn.Linear)]
    for name, module in parents:  # one layer at a time, so that a replaced weight is freed before the next is packed
        linears = [child_name for child_name, child in module.named_children()
                   if isinstance(child, nn.Linear) and child.bias is None]
        for child_name in linears:
            weight = getattr(module, child_name).weight.data
            key = (tuple(weight.shape), weight.dtype)
            if key not in by_shape:
                by_shape[key] = (choose or fastest_layout)(weight)
            layout = by_shape[key]
            if layout == "column":
                getattr(module, child_name).weight.data = column_major(weight)
            elif layout == "packed":
                setattr(module, child_name, PackedLinear(weight))
            del weight
            choices[f"{name}.{child_name}".lstrip(".")] = layout
    if model.output_proj is None:  # tied: the embedding matrix is also the output projection
        weight = model.embedding.weight.data
        layout = (choose or fastest_layout)(weight)
        if layout == "packed":  # a packed copy computes the logits; the table stays for looking up rows
            model.output_proj = PackedLinear(weight)
        elif layout == "column":
            model.embedding.weight.data = column_major(weight)
        choices["output projection (the tied embedding)"] = layout
    return choices
