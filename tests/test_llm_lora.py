"""LoRA by hand: the adapted model starts as its base, only adapters train, they save alone, merge exactly."""

import pytest
import torch

from llm.lora import (
    ALL_TARGETS,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    add_lora,
    load_adapters,
    merge_lora,
    num_adapter_parameters,
    parse_targets,
    save_adapters,
)
from llm.model import Llama, LlamaConfig
from llm.runs import CheckpointError

torch.set_num_threads(1)


def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    settings = dict(vocab_size=61, context_length=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32)
    settings.update(overrides)
    return Llama(LlamaConfig(**settings))


def tokens(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model: Llama, seed: int = 2) -> None:
    """Give every B a random value (B starts at zero, which would make every check below trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_adapted_model_starts_exactly_equal_to_its_base():
    base = tiny_model()
    adapted = add_lora(tiny_model(), rank=4, alpha=8)
    inputs = tokens()
    assert torch.equal(adapted(inputs)[0], base(inputs)[0])
    assert all(torch.count_nonzero(p) == 0 for n, p in adapted.named_parameters() if ".lora_B." in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in adapted.named_parameters() if ".lora_A." in n)


def test_adapter_computes_w_x_plus_alpha_over_r_b_a_x():
    model = add_lora(tiny_model(), rank=4, alpha=8, targets=("o",))
    randomise_adapters(model)
    layer = model.blocks[0].attention.out_proj
    x = torch.randn(5, 32)
    A, B = layer.lora_A["o"], layer.lora_B["o"]
    expected = x @ layer.weight.T + (8 / 4) * (x @ A.T @ B.T)  # the formula written out
    torch.testing.assert_close(layer(x), expected)


def test_each_logical_projection_of_a_fused_matrix_has_its_own_adapter():
    model = add_lora(tiny_model(), rank=2, alpha=2, targets=("k",))
    randomise_adapters(model)
    qkv = model.blocks[0].attention.qkv_proj
    assert set(qkv.lora_A) == {"k"} and qkv.lora_B["k"].shape == (2 * 8, 2)  # k rows: n_kv_heads * head_dim
    x = torch.randn(4, 32)
    base_output = x @ qkv.weight.T  # (4, 32 + 16 + 16)
    difference = (qkv(x) - base_output).abs()
    assert difference[:, :32].max() == 0 and difference[:, 48:].max() == 0  # q and v rows untouched
    assert difference[:, 32:48].max() > 0  # k rows changed
    gate_up = add_lora(tiny_model(), rank=2, targets=("up",)).blocks[0].ffn.gate_up_proj
    assert set(gate_up.lora_A) == {"up"}


def test_only_adapters_receive_gradients_and_the_base_stays_bitwise_equal():
    model = add_lora(tiny_model(), rank=4, alpha=8)
    base_before = {name: tensor.clone() for name, tensor in model.state_dict().items() if ".lora_" not in name}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = tokens(length=13)
    losses = []
    for _ in range(15):
        _, loss = model(inputs[:, :-1], inputs[:, 1:])
        loss.backward()
        for name, parameter in model.named_parameters():
            if ".lora_" not in name:
                assert parameter.grad is None, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base_before[name]), name
    assert any(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_adapter_parameter_count_is_r_times_in_plus_out_per_projection():
    config = LlamaConfig(vocab_size=61, context_length=16, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32)
    model = add_lora(Llama(config), rank=4)
    d, kv, ffn = 32, 16, config.ffn_hidden
    per_layer = 4 * ((d + d) + (d + kv) + (d + kv) + (d + d) + (d + ffn) + (d + ffn) + (ffn + d))
    assert num_adapter_parameters(model) == 3 * per_layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * per_layer


def test_merged_and_unmerged_forward_are_equal_and_merged_is_a_plain_llama():
    model = add_lora(tiny_model(), rank=4, alpha=8)
    randomise_adapters(model)
    inputs = tokens()
    unmerged = model(inputs)[0]
    base_keys = set(tiny_model().state_dict())
    merge_lora(model)
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    assert set(model.state_dict()) == base_keys  # exports and loads like any checkpoint
    torch.testing.assert_close(model(inputs)[0], unmerged, atol=1e-5, rtol=1e-5)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_merge_changes_the_weights_by_exactly_alpha_over_r_b_a():
    model = add_lora(tiny_model(), rank=3, alpha=6, targets=("q", "v", "down"))
    randomise_adapters(model)
    qkv = model.blocks[1].attention.qkv_proj
    before = qkv.weight.detach().clone()
    delta_q, delta_v = 2.0 * qkv.lora_B["q"] @ qkv.lora_A["q"], 2.0 * qkv.lora_B["v"] @ qkv.lora_A["v"]
    merge_lora(model)
    after = model.blocks[1].attention.qkv_proj.weight
    torch.testing.assert_close(after[:32], before[:32] + delta_q)
    torch.testing.assert_close(after[32:48], before[32:48])  # k had no adapter
    torch.testing.assert_close(after[48:], before[48:] + delta_v)


def test_disabled_adapters_give_the_base_model_without_a_copy():
    base = tiny_model()
    model = add_lora(tiny_model(), rank=4)
    randomise_adapters(model)
    inputs = tokens()
    with adapters_disabled(model):
        assert torch.equal(model(inputs)[0], base(inputs)[0])
    assert not torch.allclose(model(inputs)[0], base(inputs)[0])
    assert model.blocks[0].attention.qkv_proj.weight is not None


def test_adapters_save_alone_and_load_onto_a_fresh_base(tmp_path):
    model = add_lora(tiny_model(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2), rank=2, alpha=4, targets=("q", "v"))
    randomise_adapters(model)
    inputs = tokens()
    expected = model(inputs)[0]
    path = tmp_path / "adapters.pt"
    save_adapters(path, model, {"step": 7})
    assert not (tmp_path / "adapters.pt.tmp").exists()
    full_bytes = sum(t.numel() * t.element_size() for t in tiny_model(n_layers=3, d_model=64).state_dict().values())
    assert path.stat().st_size < full_bytes / 5  # the adapters, not the model
    fresh = tiny_model(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2)
    saved = load_adapters(path, fresh)
    assert saved["step"] == 7 and saved["lora"]["targets"] == ["q", "v"]
    assert torch.equal(fresh(inputs)[0], expected)
    assert adapter_state_dict(fresh).keys() == adapter_state_dict(model).keys()


def test_loading_adapters_refuses_another_base_and_corrupt_files(tmp_path):
    model = add_lora(tiny_model(), rank=2)
    path = tmp_path / "adapters.pt"
    save_adapters(path, model)
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapters(path, tiny_model(d_model=64))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable LoRA adapter checkpoint"):
        load_adapters(truncated, tiny_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


def test_targets_flag_parses_names_and_refuses_unknown_ones():
    assert parse_targets("all") == ALL_TARGETS
    assert parse_targets("q, v") == ("q", "v")
    with pytest.raises(ValueError, match="LoRA targets"):
        parse_targets("q,w")
    with pytest.raises(ValueError, match="LoRA targets"):
        parse_targets("")
