"""Tests of the llm chapter: tiny configs on real WikiText-2 text, each named after what it proves."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from conftest import tiny_llama_config as tiny_config
from conftest import train_llm_in_process as train_in_process

from data import fetch
from llm.generate import generate
from llm.model import (
    Llama,
    RMSNorm,
    RMSNormFunction,
    apply_rope,
    cross_entropy,
    rope_cos_sin,
    rotate,
    rotate_into_one_buffer,
)
from llm.prepare import read_token_file, write_token_file

# One thread: tiny tensors gain nothing from more, and on a busy machine extra threads only wait for cores.
torch.set_num_threads(1)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--context-length", "32",
        "--batch-size", "4", "--vocab-size", "400", "--num-samples", "1", "--sample-tokens", "8", "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-batches", "2", "--dtype", "float32"]  # exact comparisons: no bf16 autocast


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A few KB of real WikiText-2 text as a --text-file, and a data folder shared by this file's tests."""
    folder = tmp_path_factory.mktemp("llm")
    text = (fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000]
    text_file = folder / "wiki.txt"
    text_file.write_text(text, encoding="utf-8")
    return {"text_file": str(text_file), "data_dir": str(folder / "data"), "root": folder}


def train_losses(metrics_path: Path) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows}


@pytest.mark.slow
def test_tiny_pipeline_trains_with_falling_loss_and_writes_everything(corpus, run_cli):
    out_dir = corpus["root"] / "smoke"
    result = run_cli("llm/train.py", *TINY, "--text-file", corpus["text_file"], "--data-dir", corpus["data_dir"],
                     "--out-dir", str(out_dir), "--max-steps", "40", "--eval-every", "20", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters" in result.stdout and "word perplexity" in result.stdout
    losses = train_losses(out_dir / "metrics.jsonl")
    assert np.mean([losses[s] for s in range(36, 41)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    for name in ("best.pt", "last.pt", "loss.png"):
        assert (out_dir / name).is_file()
    assert "--- sample 1 ---" in result.stdout
    # the second run reuses the tokenizer and token files: their modification times do not change
    token_file = next(Path(corpus["data_dir"]).glob("*/train.bin"))
    before = token_file.stat().st_mtime_ns
    evaluation = run_cli("llm/eval.py", "--checkpoint", str(out_dir / "best.pt"), "--json", env=ONE_THREAD)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    metrics = json.loads(evaluation.stdout)  # stdout holds the JSON line alone (the progress bars go to stderr)
    assert {"loss", "bits_per_byte", "word_perplexity"} <= metrics["valid"].keys() & metrics["test"].keys()
    assert token_file.stat().st_mtime_ns == before


def test_handwritten_rms_norm_backward_matches_torch_rms_norm_and_gradcheck():
    torch.manual_seed(0)
    norm = RMSNorm(12).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = norm.weight.detach().clone().requires_grad_()
    torch.autograd.gradcheck(lambda inputs, gain: RMSNormFunction.apply(inputs, gain, norm.eps), (x, weight))
    ours = norm(x)
    reference_x = x.detach().clone().requires_grad_()
    reference_weight = norm.weight.detach().clone().requires_grad_()
    reference = torch.nn.functional.rms_norm(reference_x, (12,), reference_weight, norm.eps)
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(ours)
    ours.backward(upstream)
    reference.backward(upstream)
    torch.testing.assert_close(x.grad, reference_x.grad)
    torch.testing.assert_close(norm.weight.grad, reference_weight.grad)


def test_rope_backward_is_the_rotation_turned_back():
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(tiny_config(), 6)  # (6, hd/2)
    cos, sin = cos.double()[:, None], sin.double()[:, None]  # (T, 1, hd/2) against x (B, T, heads, hd)
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda inputs: apply_rope(inputs, cos, sin), (x,))
    upstream = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    apply_rope(x, cos, sin).backward(upstream)
    recorded = x.detach().clone().requires_grad_()
    rotate(recorded, cos, sin).backward(upstream)  # autograd's record of the same rotation
    torch.testing.assert_close(x.grad, recorded.grad)
    torch.testing.assert_close(x.grad, rotate(upstream, cos, -sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotation_written_into_one_buffer_equals_the_formula(dtype):
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(tiny_config(), 6)
    x = torch.randn(2, 6, 3, 8).to(dtype)
    rotated = rotate_into_one_buffer(x, cos[:, None], sin[:, None])
    assert rotated.dtype == dtype
    torch.testing.assert_close(rotated, rotate(x, cos[:, None], sin[:, None]))  # equal up to rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handwritten_cross_entropy_matches_torch_loss_and_gradient_with_ignored_targets(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(10, 7)).to(dtype)
    targets = torch.randint(0, 7, (10,))
    targets[[2, 5]] = -100  # ignored positions: in neither the mean nor the gradient
    ours_logits, reference_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(ours_logits, targets)
    reference = torch.nn.functional.cross_entropy(reference_logits.float(), targets)
    torch.testing.assert_close(ours, reference)
    (2 * ours).backward()
    (2 * reference).backward()
    assert ours_logits.grad.dtype == dtype
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad)
    assert ours_logits.grad[[2, 5]].abs().max() == 0
    probabilities = torch.softmax(logits.float()[0], dim=-1)  # softmax minus one-hot, over the 8 counted positions
    expected = 2 * (probabilities - torch.nn.functional.one_hot(targets[0], 7)) / 8
    torch.testing.assert_close(ours_logits.grad[0].float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_a_second_backward_through_the_loss_is_refused_not_wrong():
    # the backward pass writes the gradient over the log-probabilities it saved; autograd notices they changed
    logits = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([1, 2, -100, 3]))
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    torch.testing.assert_close(logits.grad, first)


def test_handwritten_attention_matches_fused_outputs_and_gradients():
    handwritten = Llama(tiny_config(attention_impl="handwritten"))
    fused = Llama(tiny_config(attention_impl="fused"))
    fused.load_state_dict(handwritten.state_dict())
    tokens = torch.randint(0, 97, (3, 24))
    targets = torch.randint(0, 97, (3, 24))
    logits_a, loss_a = handwritten(tokens, targets)
    logits_b, loss_b = fused(tokens, targets)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), (_, pb) in zip(handwritten.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rope_preserves_vector_norms():
    config = tiny_config()
    cos, sin = rope_cos_sin(config, 50)
    x = torch.randn(2, 4, 50, config.head_dim)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("scaling", ["none", "interpolation", "ntk"])
def test_rope_attention_score_depends_only_on_relative_position(scaling):
    config = tiny_config(rope_scaling=scaling, rope_scale=2.0)
    cos, sin = rope_cos_sin(config, 64)
    query, key = torch.randn(config.head_dim), torch.randn(config.head_dim)

    def score(query_position, key_position):
        rotated_query = apply_rope(query.view(1, 1, 1, -1), cos[query_position], sin[query_position])
        rotated_key = apply_rope(key.view(1, 1, 1, -1), cos[key_position], sin[key_position])
        return float((rotated_query * rotated_key).sum())

    assert score(10, 3) == pytest.approx(score(57, 50), abs=1e-4)
    assert score(5, 5) == pytest.approx(score(40, 40), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_rmsnorm_output_ignores_the_scale_of_its_input():
    from llm.model import RMSNorm

    norm = RMSNorm(16)
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), norm(7.5 * x), atol=1e-4, rtol=1e-4)
    assert norm(x).pow(2).mean(-1).sqrt().sub(1).abs().max() < 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_gives_the_same_logits_and_tokens_as_recomputation(temperature):
    model = Llama(tiny_config(context_length=64))
    prompt = [5, 17, 3, 42, 8]
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        outputs.append(generate(model, prompt, 30, temperature=temperature, top_k=20, top_p=0.9,
                                use_cache=use_cache, generator=generator, return_logits=True))
    (tokens_cached, logits_cached), (tokens_recomputed, logits_recomputed) = outputs
    assert tokens_cached == tokens_recomputed and len(tokens_cached) == 30
    torch.testing.assert_close(logits_cached, logits_recomputed, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses_exactly(corpus, capsys):
    common = [*TINY, "--text-file", corpus["text_file"], "--data-dir", corpus["data_dir"], "--max-steps", "10",
              "--eval-every", "4", "--num-samples", "0", "--no-final-eval"]
    straight, interrupted = corpus["root"] / "straight", corpus["root"] / "interrupted"
    train_in_process(*common, "--out-dir", str(straight))
    train_in_process(*common, "--out-dir", str(interrupted), "--stop-at-step", "6")
    assert "resume with: python llm/train.py" in capsys.readouterr().out
    train_in_process(*common, "--out-dir", str(interrupted), "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(interrupted / "metrics.jsonl") == train_losses(straight / "metrics.jsonl")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(corpus, run_cli):
    common = [*TINY, "--text-file", corpus["text_file"], "--data-dir", corpus["data_dir"], "--max-steps", "6",
              "--eval-every", "3", "--num-samples", "0", "--no-final-eval"]
    single, distributed = corpus["root"] / "single", corpus["root"] / "ddp"
    train_in_process(*common, "--batch-size", "4", "--out-dir", str(single))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "llm/train.py",
         *common, "--batch-size", "2", "--out-dir", str(distributed)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
        env={**os.environ, **ONE_THREAD},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    single_losses, ddp_losses = train_losses(single / "metrics.jsonl"), train_losses(distributed / "metrics.jsonl")
    assert single_losses.keys() == ddp_losses.keys() == set(range(1, 7))
    for step in single_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], abs=1e-4)


@pytest.mark.slow
def test_chinese_text_file_trains_and_its_tokenizer_round_trips(tmp_path):
    import sentencepiece as spm

    lines, sentence = [], []
    for row in (fetch("msra") / "msra_train.txt").read_text(encoding="utf-8").splitlines()[:150_000]:
        if row.strip():
            sentence.append(row.split()[0])
        elif sentence:
            lines.append("".join(sentence))
            sentence = []
    text_file = tmp_path / "chinese.txt"
    text_file.write_text("\n".join(lines), encoding="utf-8")
    train_in_process(*TINY, "--text-file", str(text_file), "--vocab-size", "2500", "--data-dir", str(tmp_path / "d"),
                     "--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--eval-every", "2", "--num-samples", "0",
                     "--no-final-eval")
    processor = spm.SentencePieceProcessor(model_file=str(next((tmp_path / "d").glob("*/tokenizer.model"))))
    assert processor.decode(processor.encode(lines[0])) == lines[0]
    assert (tmp_path / "run" / "last.pt").is_file()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, monkeypatch, capsys):
    import llm.model

    out_dir = corpus["root"] / "diverging"
    real_cross_entropy, calls = llm.model.cross_entropy, {"count": 0}

    def cross_entropy_that_breaks(*arguments, **keywords):
        calls["count"] += 1
        loss = real_cross_entropy(*arguments, **keywords)
        return loss * float("nan") if calls["count"] > 8 else loss

    common = [*TINY, "--text-file", corpus["text_file"], "--data-dir", corpus["data_dir"], "--out-dir", str(out_dir),
              "--max-steps", "10", "--eval-every", "2", "--eval-batches", "1", "--num-samples", "0"]
    monkeypatch.setattr(llm.model, "cross_entropy", cross_entropy_that_breaks)
    with pytest.raises(SystemExit) as stopped:
        train_in_process(*common)
    assert stopped.value.code == 1
    assert "loss is not finite at step" in capsys.readouterr().err
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    assert checkpoint["step"] < 10 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode, expected", [("on", "handwritten"), ("off", "fused")])
def test_auto_attention_is_handwritten_exactly_when_compiled_on_a_cpu(corpus, compile_mode, expected, capsys):
    from llm.checkpoint import load_model
    from llm.train import compiler_problem

    if compile_mode == "on" and compiler_problem("cpu"):
        pytest.skip(compiler_problem("cpu"))
    out_dir = corpus["root"] / f"attention-{compile_mode}"
    train_in_process(*TINY, "--text-file", corpus["text_file"], "--data-dir", corpus["data_dir"], "--out-dir",
                     str(out_dir), "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--num-samples", "0",
                     "--no-final-eval", "--compile", compile_mode)
    assert f"attention: {expected} (auto)" in capsys.readouterr().out
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    assert checkpoint["config"]["attention_impl"] == expected and checkpoint["args"]["attention_impl"] == "auto"
    assert load_model(out_dir / "last.pt", "cpu")[0].config.attention_impl == "fused"  # scoring and generating: eager


def test_token_files_switch_to_uint32_above_65535_tokens_of_vocabulary(tmp_path):
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    write_token_file(small, [0, 65535, 7], vocab_size=65536)
    write_token_file(large, [0, 65536, 99999], vocab_size=100000)
    assert read_token_file(small).dtype == np.uint16 and list(read_token_file(small)) == [0, 65535, 7]
    assert read_token_file(large).dtype == np.uint32 and list(read_token_file(large)) == [0, 65536, 99999]
    with pytest.raises(ValueError):
        write_token_file(small, [65536], vocab_size=65536)


@pytest.mark.slow
def test_bad_inputs_end_with_one_clear_error(corpus, run_cli, tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)) * 4)
    arguments = [*TINY, "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")]
    assert_one_line_error(run_cli("llm/train.py", *arguments, "--text-file", str(empty), env=ONE_THREAD), "empty")
    with pytest.raises(SystemExit, match="^error: .*binary"):
        train_in_process(*arguments, "--text-file", str(binary))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(run_cli("llm/eval.py", "--checkpoint", str(corrupt), env=ONE_THREAD),
                          "not a readable llm checkpoint")
    good = corpus["root"] / "straight" / "last.pt"
    if not good.exists():
        pytest.skip("needs the resume test's checkpoint")
    empty_prompt = run_cli("llm/generate.py", "--checkpoint", str(good), "--prompt", "  ", env=ONE_THREAD)
    assert_one_line_error(empty_prompt, "prompt is empty")
    # resuming with another model shape refuses, and leaves the good checkpoint untouched
    before = good.read_bytes()
    with pytest.raises(SystemExit, match="^error: --d-model was 32 in the saved run and is 64 now"):
        train_in_process(*TINY, "--d-model", "64", "--text-file", corpus["text_file"], "--data-dir",
                         corpus["data_dir"], "--out-dir", str(good.parent), "--resume")
    assert good.read_bytes() == before


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from llm.train import learning_rate, parse_args

    args = parse_args(["--lr", "1e-3", "--warmup-steps", "10", "--max-steps", "100", "--min-lr-ratio", "0.1"])
    assert learning_rate(0, args) == pytest.approx(1e-4)
    assert learning_rate(9, args) == pytest.approx(1e-3)
    assert learning_rate(100, args) == pytest.approx(1e-4)
    assert 1e-4 < learning_rate(55, args) < 1e-3
    assert math.isclose(learning_rate(55, args), 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("stride", [32, 16, 5, 1])
def test_sliding_window_scores_every_token_once_and_non_overlapping_is_the_default(stride):
    from llm.eval import total_negative_log_likelihood

    model = Llama(tiny_config(context_length=32))
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 203).astype(np.uint16)
    total, scored = total_negative_log_likelihood(model, tokens, 32, 4, "cpu", stride)
    assert scored == len(tokens) - 1 and math.isfinite(total)
    if stride == 32:  # non-overlapping windows: the same as leaving the stride out
        assert math.isclose(total, total_negative_log_likelihood(model, tokens, 32, 4, "cpu")[0], rel_tol=1e-6)
    else:  # tokens scored with more context: one model, one text, a different (here: random-model) total
        assert total != total_negative_log_likelihood(model, tokens, 32, 4, "cpu")[0]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--stride", "--context-length"])
def test_eval_rejects_a_zero_stride_or_context_with_one_line(run_cli, flag):
    result = run_cli("llm/eval.py", flag, "0")
    assert result.returncode != 0 and result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
