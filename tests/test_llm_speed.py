"""Tests of the llm chapter's speed paths: the precision and compile choices, the fused projections, and
generation at the edges of the context. They check results, never timings (llm/bench.py measures speed)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config as tiny_config

from data import fetch
from llm.checkpoint import check_tokenizer
from llm.generate import generate
from llm.model import Llama, LlamaConfig, apply_rope
from llm.prepare import file_sha256, prepare
from llm.train import (
    COMPILE_SAVES,
    COMPILE_SECONDS,
    automatic_attention,
    choose_dtype,
    compiler_problem,
    decide_compile,
)

# One thread: tiny tensors gain nothing from more, and on a busy machine extra threads only wait for cores.
torch.set_num_threads(1)
CPU = torch.device("cpu")


def stubbed_matmul(figures: dict):
    """A stand-in for measure_matmul_peak that returns the given FLOP/s for each dtype (and draws from the RNG)."""

    def measure(device, dtype, size, repeats):
        torch.randn(4)  # a real measurement draws random matrices: the choice must not move the training RNG
        return figures[dtype]

    return measure


def test_auto_dtype_takes_bf16_on_a_cpu_only_where_its_matmul_is_clearly_faster():
    fast_bf16 = stubbed_matmul({torch.float32: 100e9, torch.bfloat16: 400e9})  # AMX / AVX-512 BF16
    emulated_bf16 = stubbed_matmul({torch.float32: 100e9, torch.bfloat16: 1e9})  # no bf16 units: 100x slower
    marginal_bf16 = stubbed_matmul({torch.float32: 100e9, torch.bfloat16: 110e9})  # not worth the precision
    choice, reason = choose_dtype(CPU, fast_bf16)
    assert choice == "bfloat16"
    assert "400.0" in reason and "100.0" in reason  # the header shows both figures
    assert choose_dtype(CPU, emulated_bf16)[0] == "float32"
    assert choose_dtype(CPU, marginal_bf16)[0] == "float32"


def test_auto_dtype_is_not_decided_by_one_busy_moment_of_the_machine():
    readings = {torch.float32: [100e9, 100e9, 100e9], torch.bfloat16: [90e9, 400e9, 380e9]}  # the first bf16: busy

    def measure(device, dtype, size, repeats):
        return readings[dtype].pop(0)

    choice, reason = choose_dtype(CPU, measure)
    assert choice == "bfloat16" and "400.0" in reason


def test_auto_dtype_measurement_leaves_the_training_rng_where_it_was():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    choose_dtype(CPU, stubbed_matmul({torch.float32: 1.0, torch.bfloat16: 2.0}))
    choose_dtype(CPU)  # the real measurement too
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_compile_auto_runs_eager_when_the_run_is_too_short_and_on_off_are_obeyed():
    # the break-even run: compiling saves exactly what it costs
    break_even = {name: COMPILE_SECONDS / saves for name, saves in COMPILE_SAVES.items()}
    assert break_even["float32"] > break_even["bfloat16"]  # fp32 gains less from compiling: it needs a longer run
    compiled, reason = decide_compile("auto", CPU, 0.9 * break_even["bfloat16"], "bfloat16")
    assert not compiled and reason.startswith("off (about") and "too short" in reason
    compiled, reason = decide_compile("auto", CPU, 1.5 * break_even["bfloat16"], "float32")
    assert not compiled and "too short" in reason  # long enough in bf16, not in fp32
    assert decide_compile("off", CPU, 10 * break_even["float32"]) == (False, "off (--compile off)")
    assert decide_compile("on", CPU, 1.0) == (True, "on (--compile on)")
    compiled, reason = decide_compile("auto", CPU, 1.1 * break_even["float32"], "float32")
    assert compiled == (compiler_problem("cpu") == "")  # a long run compiles exactly where a compiler works
    assert reason.startswith("on (about" if compiled else "off (torch.compile")


@pytest.mark.slow
def test_compiled_model_gives_the_eager_loss_and_gradients():
    """The compiler traces the hand-written backward passes (RMSNorm, RoPE) like any other code."""
    problem = compiler_problem("cpu")
    if problem:
        pytest.skip(problem)
    eager, compiled = Llama(tiny_config()), Llama(tiny_config())
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 97, (2, 25))  # (B, T+1)
    eager_logits, eager_loss = eager(tokens[:, :-1], tokens[:, 1:])
    compiled_logits, compiled_loss = torch.compile(compiled)(tokens[:, :-1], tokens[:, 1:])
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-4)
    eager_loss.backward()
    compiled_loss.backward()
    for (name, expected), (_, got) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_bf16_handwritten_attention_trains_like_the_fused_kernel():
    """Compiled under bf16 autocast, the hand-written softmax gives a finite loss and finite gradients, close to
    the fused kernel's. Its row maximum is detached: with the maximum in the graph, inductor's backward of amax
    compared fp32 scores with a bf16-rounded maximum, found no maximum in a row and divided by that count, 0 (NaN)."""
    problem = compiler_problem("cpu")
    if problem:
        pytest.skip(problem)
    models = {impl: Llama(tiny_config(attention_impl=impl)) for impl in ("handwritten", "fused")}
    models["fused"].load_state_dict(models["handwritten"].state_dict())
    tokens = torch.randint(0, 97, (2, 25))  # (B, T+1); head size 8: the scale 1/sqrt(8) is not a power of two
    losses = {}
    for impl, model in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses[impl] = torch.compile(model)(tokens[:, :-1], tokens[:, 1:])
        losses[impl].backward()
    assert torch.isfinite(losses["handwritten"])
    assert losses["handwritten"].item() == pytest.approx(losses["fused"].item(), abs=2e-2)
    for (name, hand), (_, fused) in zip(models["handwritten"].named_parameters(), models["fused"].named_parameters()):
        assert torch.isfinite(hand.grad).all(), name
        torch.testing.assert_close(hand.grad, fused.grad, atol=2e-2, rtol=5e-2, msg=name)

def unfused_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """The model's forward pass with separate W_q, W_k, W_v and W_gate, W_up matmuls, written out."""
    config = model.config
    batch, length = tokens.shape
    heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
    cos, sin = model.rope_cos[:length], model.rope_sin[:length]
    x = model.embedding(tokens)  # (B, T, d)
    for block in model.blocks:
        attention, ffn = block.attention, block.ffn
        w_query, w_key, w_value = attention.qkv_proj.weight.split(attention.qkv_sizes)  # rows [W_q; W_k; W_v]
        h = block.attention_norm(x)
        query = (h @ w_query.T).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
        key = (h @ w_key.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        value = (h @ w_value.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        key = key.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, T, hd)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)  # (B, H, T, hd)
        x = x + attended.transpose(1, 2).reshape(batch, length, -1) @ attention.out_proj.weight.T
        w_gate, w_up = ffn.gate_up_proj.weight.split(config.ffn_hidden)  # rows [W_gate; W_up]
        h = block.ffn_norm(x)
        x = x + (F.silu(h @ w_gate.T) * (h @ w_up.T)) @ ffn.down_proj.weight.T
    return model.final_norm(x) @ model.embedding.weight.T  # (B, T, vocab)


def test_fused_qkv_and_gate_up_projections_give_the_logits_of_separate_matmuls():
    model = Llama(tiny_config(n_heads=4, n_kv_heads=2)).eval()
    tokens = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        fused, _ = model(tokens)
        torch.testing.assert_close(fused, unfused_logits(model, tokens), atol=1e-5, rtol=1e-4)


def uncached_window_reference(model: Llama, prompt: list[int], new_tokens: int):
    """Greedy decoding written plainly: every step runs the whole latest window of the context's length."""
    window = model.config.context_length
    tokens, step_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(torch.tensor([tokens[-window:]]))
            step_logits.append(logits[0, -1])
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):], torch.stack(step_logits)


@pytest.mark.parametrize("prompt_length", [10, 24, 40])  # shorter than, as long as and longer than the context
def test_generation_past_the_context_gives_every_token_and_equals_the_uncached_window(prompt_length, capsys):
    model = Llama(tiny_config(context_length=24)).eval()
    prompt = torch.randint(0, 97, (prompt_length,)).tolist()
    expected_tokens, expected_logits = uncached_window_reference(model, prompt, 30)  # runs 16-46 past the context
    for use_cache in (True, False):
        tokens, logits = generate(model, prompt, 30, temperature=0.0, use_cache=use_cache, return_logits=True)
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    notices = capsys.readouterr().err.splitlines()
    if prompt_length > 24:  # said once per call, in one line
        assert notices == [f"note: the prompt has {prompt_length} tokens, more than the model's context of 24; "
                           "it continues from the last 24"] * 2
    else:
        assert notices == []


def test_sampled_generation_past_the_context_is_the_same_with_and_without_the_cache():
    model = Llama(tiny_config(context_length=16)).eval()
    prompt = torch.randint(0, 97, (20,)).tolist()
    runs = [generate(model, prompt, 40, temperature=1.0, top_p=0.9, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(5), notice=lambda message: None)
            for use_cache in (True, False)]
    assert len(runs[0]) == 40 and runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_models_in_bf16_and_float64_generate_with_a_cache_of_their_own_dtype(dtype):
    model = Llama(tiny_config(context_length=16)).to(dtype).eval()
    prompt = torch.randint(0, 97, (6,)).tolist()
    cached, cached_logits = generate(model, prompt, 20, temperature=0.0, return_logits=True)
    recomputed, recomputed_logits = generate(model, prompt, 20, temperature=0.0, use_cache=False, return_logits=True)
    assert len(cached) == 20
    if dtype == torch.float64:  # in float64 the cache changes nothing but the work done
        assert cached == recomputed
        torch.testing.assert_close(cached_logits, recomputed_logits, atol=1e-10, rtol=1e-10)
    else:  # bf16 rounds the prefill and the one-position steps differently: close, not equal
        assert (cached_logits - recomputed_logits).abs().max() < 0.05


@pytest.mark.slow
def test_a_tokenizer_other_than_the_checkpoints_is_refused_in_one_line(tmp_path, run_cli):
    text_file = tmp_path / "wiki.txt"
    text_file.write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    data_dir = tmp_path / "data"
    prepared = prepare("wikitext-2", 400, data_dir, str(text_file), log=lambda *a: None)
    config = tiny_config(vocab_size=400)
    checkpoint = {"model": Llama(config).state_dict(), "config": config.to_dict(), "step": 1,
                  "args": {"dataset": "wikitext-2", "text_file": str(text_file), "data_dir": str(data_dir)},
                  "tokenizer_path": str(prepared.tokenizer_path),
                  "tokenizer_sha256": file_sha256(prepared.tokenizer_path)}
    check_tokenizer(checkpoint, prepared.tokenizer_path, "good.pt")  # the recorded tokenizer passes
    checkpoint["tokenizer_sha256"] = "0" * 64  # as if the text had changed and the tokenizer been retrained since
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="sha256 differs"):
        check_tokenizer(checkpoint, prepared.tokenizer_path, path)
    for script in ("llm/generate.py", "llm/eval.py", "llm/long_context.py"):
        extra = ["--out-dir", str(tmp_path)] if script == "llm/long_context.py" else []
        result = run_cli(script, "--checkpoint", str(path), *extra, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode != 0, script
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the tokenizer") and "sha256 differs" in lines[0], (
            script, result.stderr[-500:])
        assert Path(prepared.tokenizer_path).is_file()


def reference_shape(config: LlamaConfig):
    from llm.reference_models import ReferenceShape

    return ReferenceShape(vocab_size=config.vocab_size, context_length=config.context_length, d_model=config.d_model,
                          n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                          norm_eps=config.norm_eps, rope_theta=config.rope_theta)


def test_the_llama2c_reference_computes_our_model_given_our_weights():
    """bench.py compares speed at the same shape; this shows it is the same function, not just the same size."""
    from llm.hf import halves_to_neighbour_pairs, hf_tensors_from_ours
    from llm.reference_models import build_llama2c

    torch.manual_seed(0)
    config = tiny_config()
    ours = Llama(config).double()
    reference = build_llama2c(reference_shape(config)).double()
    assert sum(p.numel() for p in reference.parameters()) == ours.num_parameters()
    tensors = hf_tensors_from_ours(ours)
    state = {"tok_embeddings.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    for n in range(config.n_layers):
        hf, mine = f"model.layers.{n}.", f"layers.{n}."
        state.update({
            mine + "attention.wq.weight": halves_to_neighbour_pairs(tensors[hf + "self_attn.q_proj.weight"],
                                                                    config.n_heads),
            mine + "attention.wk.weight": halves_to_neighbour_pairs(tensors[hf + "self_attn.k_proj.weight"],
                                                                    config.n_kv_heads),
            mine + "attention.wv.weight": tensors[hf + "self_attn.v_proj.weight"],
            mine + "attention.wo.weight": tensors[hf + "self_attn.o_proj.weight"],
            mine + "feed_forward.w1.weight": tensors[hf + "mlp.gate_proj.weight"],
            mine + "feed_forward.w3.weight": tensors[hf + "mlp.up_proj.weight"],
            mine + "feed_forward.w2.weight": tensors[hf + "mlp.down_proj.weight"],
            mine + "attention_norm.weight": tensors[hf + "input_layernorm.weight"],
            mine + "ffn_norm.weight": tensors[hf + "post_attention_layernorm.weight"],
        })
    state["output.weight"] = state["tok_embeddings.weight"]
    reference.model.load_state_dict(state)
    inputs, targets = torch.randint(0, config.vocab_size, (2, 3, config.context_length))
    our_logits, our_loss = ours(inputs, targets)
    their_logits, their_loss = reference(inputs, targets)
    # float64 models, but llama2.c rotates in float32 (x.float(), float32 tables): agreement to float32 rounding
    torch.testing.assert_close(their_logits, our_logits.view_as(their_logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(their_loss.to(our_loss.dtype), our_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama2.c", "nanoGPT"])
def test_each_reference_model_trains_in_the_benchs_training_step(name):
    from llm.bench import TrainingRun, default_config
    from llm.reference_models import REFERENCE_MODELS

    config = tiny_config()
    _, train_args = default_config()
    torch.manual_seed(0)
    run = TrainingRun(config, train_args, CPU, "float32", False, batch_size=4,
                      model=REFERENCE_MODELS[name](reference_shape(config)))
    losses = []
    for _ in range(8):
        with run.autocast:
            _, loss = run.model(run.inputs, run.targets)
        losses.append(loss.item())
        run.step()
    assert losses[-1] < losses[0] - 0.1, losses  # the same batch again and again: the loss must fall


def test_the_bench_marks_a_way_whose_loss_is_not_finite():
    """A fast way that computes NaN is no result: TrainingRun says so, and bench.py reports no speed for it."""
    from llm.bench import TrainingRun, default_config

    class NotFinite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2, 2))

        def forward(self, tokens, targets):
            return None, (self.weight.sum() * float("nan"))

    _, train_args = default_config()
    config = tiny_config()
    assert not TrainingRun(config, train_args, CPU, "float32", False, batch_size=2, model=NotFinite()).finite
    assert TrainingRun(config, train_args, CPU, "float32", False, batch_size=2).finite


def test_the_nanogpt_reference_has_no_biases_as_its_training_script_sets():
    """nanoGPT's train.py sets bias = False: no bias in any Linear or LayerNorm; what is left is GPT-2's weights."""
    from llm.reference_models import build_nanogpt

    config = tiny_config()
    model = build_nanogpt(reference_shape(config))
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    d, layers = config.d_model, config.n_layers
    per_layer = 3 * d * d + d * d + 2 * 4 * d * d + 2 * d  # c_attn, c_proj, the MLP, two LayerNorm gains
    expected = config.vocab_size * d + config.context_length * d + layers * per_layer + d  # tied wte, wpe, ln_f
    assert sum(p.numel() for p in model.parameters()) == expected


def test_bench_builds_a_reference_from_a_readers_model_file(tmp_path):
    """--nanogpt-model / --llama2c-model import a model.py from a path; a file with the originals' names builds and
    trains in the bench's step (here one that re-exports the rebuilds under those names)."""
    from llm.bench import TrainingRun, default_config
    from llm.reference_models import REFERENCE_MODELS, import_model_file

    files = {"nanoGPT": "from llm.reference_models import NanoGPT as GPT, NanoGPTConfig as GPTConfig\n",
             "llama2.c": "from llm.reference_models import Llama2cTransformer as Transformer\n"
                         "from llm.reference_models import Llama2cArgs as ModelArgs\n"}
    config = tiny_config()
    _, train_args = default_config()
    for name, text in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        module = import_model_file(str(path), f"test_original_{name.replace('.', '_')}")
        torch.manual_seed(0)
        rebuilt = REFERENCE_MODELS[name](reference_shape(config))
        torch.manual_seed(0)
        imported = REFERENCE_MODELS[name](reference_shape(config), module)
        inputs, targets = torch.randint(0, config.vocab_size, (2, 2, config.context_length))  # (B, T) each
        assert torch.equal(rebuilt(inputs, targets)[1], imported(inputs, targets)[1])
        run = TrainingRun(config, train_args, CPU, "float32", False, batch_size=2, model=imported)
        assert run.finite


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--nanogpt-model", "--llama2c-model"])
def test_bench_refuses_a_missing_or_foreign_model_file_in_one_line(flag, tmp_path, run_cli):
    foreign = tmp_path / "model.py"
    foreign.write_text("x = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    for path, words in ((tmp_path / "absent.py", "no such file"), (foreign, "defines no"),
                        (broken, "cannot be imported")):
        result = run_cli("llm/bench.py", flag, str(path), "--references-only", env={"OMP_NUM_THREADS": "1"})
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and words in lines[0], result.stderr[-500:]


def copied_heads_attention(query, key, value, query_start):
    """Grouped-query attention written plainly: every key/value head copied for its group, an explicit mask."""
    group = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)  # (B, H, Tk, hd)
    query_positions = torch.arange(query_start, query_start + query.size(2))
    allowed = torch.arange(key.size(2))[None, :] <= query_positions[:, None]  # (Tq, Tk)
    scores = (query @ key.transpose(-2, -1) / query.size(-1) ** 0.5).masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ value  # (B, H, Tq, hd)


@pytest.mark.parametrize("query_start", [0, 5])  # training / a prompt read after 5 cached positions
def test_both_attentions_read_key_value_heads_in_place_like_copied_heads(query_start):
    """The fused kernel (enable_gqa) and the hand-written attention (a group's queries as extra rows) give the
    outputs and gradients of copying each key/value head for its query heads."""
    from llm.model import fused_causal_attention, handwritten_causal_attention

    torch.manual_seed(0)
    query = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)  # (B, H, Tq, hd)
    key, value = (torch.randn(2, 2, query_start + 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    expected = copied_heads_attention(query, key, value, query_start)
    expected_gradients = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for attend in (fused_causal_attention, handwritten_causal_attention):
        attended = attend(query, key, value, query_start)
        torch.testing.assert_close(attended, expected, msg=attend.__name__)
        for gradient, wanted in zip(torch.autograd.grad(attended.square().sum(), (query, key, value)),
                                    expected_gradients):
            torch.testing.assert_close(gradient, wanted, msg=attend.__name__)


def test_fused_attention_runs_in_fp32_under_bf16_autocast_on_a_cpu():
    """Under bf16 autocast on a CPU the attention kernel gets fp32 inputs (its bf16 backward is the slower one there):
    its output is fp32 and equals the fp32 computation of the same inputs."""
    from llm.model import fused_causal_attention

    query, key, value = torch.randn(1, 4, 16, 8).bfloat16(), torch.randn(1, 2, 16, 8).bfloat16(), torch.randn(
        1, 2, 16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attended = fused_causal_attention(query, key, value)
    assert attended.dtype == torch.float32
    expected = copied_heads_attention(query.float(), key.float(), value.float(), 0)
    torch.testing.assert_close(attended, expected, atol=1e-5, rtol=1e-5)


def test_bench_times_each_way_with_the_attention_train_py_would_choose():
    from llm.bench import compare_training, default_config

    assert automatic_attention(True, "cpu") == "handwritten"
    assert automatic_attention(False, "cpu") == automatic_attention(True, "cuda") == "fused"
    config = tiny_config()
    _, train_args = default_config()
    results = compare_training(config, train_args, CPU, steps=1, rounds=2, precisions=["float32"], compile_too=False)
    way = results["ways"]["eager_float32"]
    assert way["attention_impl"] == "fused" and way["loss_finite"] and len(way["tokens_per_s"]["runs"]) == 2
    assert way["ratio_to_eager_float32"]["median"] == 1.0
