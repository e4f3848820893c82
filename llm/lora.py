"""LoRA by hand: a frozen weight W plus a trainable low-rank update, y = W x + (alpha / r) B A x.

    add_lora(model, rank=8, alpha=16)          # every attention and FFN projection gets adapters; the rest freezes
    save_adapters(path, model)                 # the adapters alone: a file of a few MB
    load_adapters(path, model)                 # ... onto a fresh copy of the same base model
    merge_lora(model)                          # W <- W + (alpha / r) B A: a plain Llama again, for export and chat

A (r, d_in) starts random and B (d_out, r) starts at zero (Hu et al., 2021), so B A = 0 and the adapted model
computes exactly what its base computes until the first update moves B. Only A and B train: for SmolLM2-135M at
rank 8 that is 2.4 M numbers against 134.5 M.

Our model keeps two pairs of projections fused in one matrix: attention's qkv_proj holds the rows [W_q; W_k; W_v]
and the FFN's gate_up_proj the rows [W_gate; W_up]. We give every LOGICAL projection its own adapter (A_q, B_q,
A_k, B_k, ...), applied to its own block of rows of the fused output, rather than one adapter on the fused matrix:
that is the update Hugging Face's PEFT and the LoRA paper train on a Llama (the paper adapts W_q and W_v alone,
which `targets` can ask for), each projection gets a rank-r update of its own instead of three sharing one rank-r
space, and the parameter count equals PEFT's.
"""

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model import Llama
from llm.runs import CheckpointError, load_checkpoint, save_checkpoint

# The logical projections of a block, by the fused module that holds them and their order in its rows.
PROJECTIONS = {"attention.qkv_proj": ("q", "k", "v"), "attention.out_proj": ("o",),
               "ffn.gate_up_proj": ("gate", "up"), "ffn.down_proj": ("down",)}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'); 'all' -> every projection. Raises ValueError naming an unknown one."""
    if text.strip() == "all":
        return ALL_TARGETS
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in ALL_TARGETS]
    if unknown or not names:
        raise ValueError(f"LoRA targets must be 'all' or a comma-separated subset of {','.join(ALL_TARGETS)}, "
                         f"not {text!r}")
    return names


class LoRALinear(nn.Linear):
    """A frozen nn.Linear whose row blocks (one per logical projection) each gain a low-rank update.

    The base weight keeps its name (`weight`), so the state dict of an adapted model is the base's plus
    `lora_A.<part>` and `lora_B.<part>`: base checkpoints load into it unchanged.
    """

    def __init__(self, base: nn.Linear, parts: dict[str, int], targets, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the same Parameter: no copy of the base in memory
        self.weight.requires_grad_(False)
        self.part_sizes = list(parts.values())  # rows of each logical projection in order, e.g. [q, k, v]
        self.part_names = list(parts)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True  # False: the base alone (the DPO reference), without a second copy of the model
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, rows in parts.items():
            if name not in targets:
                continue
            # A as in the LoRA authors' code (loralib): Kaiming-uniform, bound 1/sqrt(d_in); B zero so B A = 0
            A = torch.empty(rank, base.in_features, device=device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(A)  # (r, d_in)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, rank, device=device))  # (d_out_part, r)

    def delta(self, name: str) -> torch.Tensor:
        """(alpha / r) B A of one projection: the matrix its adapter adds to the base weight's rows."""
        return self.scale * (self.lora_B[name] @ self.lora_A[name])  # (d_out_part, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, self.weight)  # (..., d_out): W x, all parts at once
        if not self.enabled or not len(self.lora_A):
            return output
        dropped = self.dropout(x)
        pieces = output.split(self.part_sizes, dim=-1)  # W_q x, W_k x, W_v x (or one piece)
        adapted = []
        for name, piece in zip(self.part_names, pieces):
            if name in self.lora_A:
                A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
                # two thin products, never the d_out x d_in matrix B A: (..., d_in) -> (..., r) -> (..., d_part)
                piece = piece + self.scale * F.linear(F.linear(dropped, A), B)
            adapted.append(piece)
        return torch.cat(adapted, dim=-1) if len(adapted) > 1 else adapted[0]  # (..., d_out)


def projection_parts(model: Llama, module_name: str) -> dict[str, int]:
    """The logical projections inside one of a block's linear maps, with their row counts."""
    config = model.config
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    sizes = {"q": q_rows, "k": kv_rows, "v": kv_rows, "o": config.d_model, "gate": config.ffn_hidden,
             "up": config.ffn_hidden, "down": config.d_model}
    return {name: sizes[name] for name in PROJECTIONS[module_name]}


def add_lora(model: Llama, rank: int = 8, alpha: float = 16.0, targets=ALL_TARGETS, dropout: float = 0.0) -> Llama:
    """Freeze every base weight and put adapters on the `targets` projections of every block (in place)."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    if lora_settings(model) is not None:
        raise ValueError("this model already has LoRA adapters")
    targets = tuple(targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in model.blocks:
        for module_name, names in PROJECTIONS.items():
            if not set(names) & set(targets):
                continue
            parent_name, child_name = module_name.split(".")
            parent = getattr(block, parent_name)
            parts = projection_parts(model, module_name)
            setattr(parent, child_name, LoRALinear(getattr(parent, child_name), parts, targets, rank, alpha, dropout))
    model.lora = {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout}
    return model


def lora_settings(model: Llama) -> dict | None:
    return getattr(model, "lora", None)


def lora_modules(model: nn.Module):
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def adapter_state_dict(model: Llama) -> dict:
    """The adapter tensors alone (lora_A / lora_B of every adapted projection), detached, on the CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items() if ".lora_" in name}


def num_adapter_parameters(model: Llama) -> int:
    return sum(tensor.numel() for tensor in adapter_state_dict(model).values())


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model is its base (the adapters are skipped), e.g. for DPO's reference log-probs."""
    modules = lora_modules(model)
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.enabled = True


def save_adapters(path: Path, model: Llama, extra: dict | None = None) -> None:
    """Write the adapters, their settings and the base model's config atomically (tensors and plain values only)."""
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("this model has no LoRA adapters to save")
    state = {"adapters": adapter_state_dict(model), "lora": dict(settings), "base_config": model.config.to_dict()}
    save_checkpoint(Path(path), {**state, **(extra or {})})


def load_adapters(path: Path, model: Llama) -> dict:
    """Put the adapters saved at `path` onto `model` (its base weights untouched); return the whole file's dict."""
    saved = load_checkpoint(Path(path), "LoRA adapter", required=("adapters", "lora", "base_config"))
    if saved["base_config"] != model.config.to_dict():
        raise CheckpointError(f"{path} was trained on another base model (its config differs from this model's)")
    settings = saved["lora"]
    add_lora(model, int(settings["rank"]), float(settings["alpha"]), parse_targets(",".join(settings["targets"])),
             float(settings.get("dropout", 0.0)))
    expected = adapter_state_dict(model)
    if set(expected) != set(saved["adapters"]):
        raise CheckpointError(f"{path} holds adapters for other projections than its settings name")
    for name, tensor in saved["adapters"].items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: adapter {name} has shape {tuple(tensor.shape)}, "
                                  f"the model needs {tuple(expected[name].shape)}")
    model.load_state_dict(saved["adapters"], strict=False)
    return saved


@torch.no_grad()
def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its weight, W <- W + (alpha / r) B A, and put plain nn.Linear maps back (in place).

    Merge into float32 weights: a bf16 weight cannot hold the sum. Its spacing near a typical weight of SmolLM2
    (0.19) is 2^-10, about 1e-3, while an update after a few dozen LoRA steps is about 3e-4, so rounding
    W + (alpha / r) B A to bf16 throws most of the fine-tune away (merge_adapter_files loads the base in float32).
    """
    for block in model.blocks:
        for module_name in PROJECTIONS:
            parent_name, child_name = module_name.split(".")
            parent = getattr(block, parent_name)
            module = getattr(parent, child_name)
            if not isinstance(module, LoRALinear):
                continue
            weight = module.weight.float()  # (d_out, d_in), summed in float32 (stored back in the weight's dtype)
            pieces = list(weight.split(module.part_sizes, dim=0))
            for index, name in enumerate(module.part_names):
                if name in module.lora_A:
                    pieces[index] = pieces[index] + module.delta(name).float()
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device=weight.device,
                              dtype=module.weight.dtype)
            plain.weight.copy_(torch.cat(pieces, dim=0))
            setattr(parent, child_name, plain)
    if hasattr(model, "lora"):
        del model.lora
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def merge_adapter_files(model: Llama, paths) -> Llama:
    """Load each LoRA adapter file onto `model` and fold it into the weights, one after the other (in place).

    Give it the base in float32 (see merge_lora): then the merged model computes what base + adapters compute, up
    to float32 rounding.
    """
    for path in paths:
        load_adapters(Path(path), model)
        merge_lora(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
