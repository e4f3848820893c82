"""llm/eval.py scores what its flags say: --split picks the splits, --max-tokens the beginning of each, and the loss
is the one computed by hand for a model whose predictions are known in closed form; the progress bar goes to stderr
and --json alone to stdout; a bad value of any flag ends in one line."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import made_up_text_file

from llm import eval as evaluation
from llm.model import Llama, LlamaConfig
from llm.prepare import encode_text, file_sha256, prepare, read_token_file

VOCAB, SHARPNESS = 320, 0.1  # the embedding is SHARPNESS * identity (d_model = VOCAB)


@pytest.fixture(scope="module")
def repeat_model(tmp_path_factory) -> dict:
    """A checkpoint of a model that predicts "the next token repeats this one": every block's weights are zero, the
    embedding is c * identity, so the logits of the token after token i are a * [j == i] with
    a = c^2 / sqrt(c^2 / V + eps) (the final RMSNorm of c * e_i, dotted with the embedding); and its data."""
    folder = tmp_path_factory.mktemp("eval")
    text_file = made_up_text_file(folder / "corpus.txt")
    prepared = prepare("text", VOCAB, folder / "data", str(text_file), log=lambda *a: None)
    config = LlamaConfig(vocab_size=VOCAB, context_length=64, n_layers=1, n_heads=4, n_kv_heads=2, d_model=VOCAB)
    model = Llama(config)
    state = {name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()}
    state["embedding.weight"] = SHARPNESS * torch.eye(VOCAB)
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = torch.ones(VOCAB)
    checkpoint = folder / "repeat.pt"
    torch.save({"model": state, "config": config.to_dict(), "step": 0,
                "args": {"dataset": "text", "text_file": str(text_file), "data_dir": str(folder / "data")},
                "tokenizer_path": str(prepared.tokenizer_path),
                "tokenizer_sha256": file_sha256(prepared.tokenizer_path)}, checkpoint)
    return {"checkpoint": str(checkpoint), "prepared": prepared}


def hand_computed_loss(tokens) -> float:
    """Mean -log p over tokens[1:]: log(e^a + V - 1) for every target, minus a where it repeats the token before."""
    a = SHARPNESS**2 / math.sqrt(SHARPNESS**2 / VOCAB + 1e-5)
    tokens = np.asarray(tokens, dtype=np.int64)
    repeats = int((tokens[1:] == tokens[:-1]).sum())
    return (math.log(math.exp(a) + VOCAB - 1) * (len(tokens) - 1) - a * repeats) / (len(tokens) - 1)


def run_eval(arguments, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["eval.py", *arguments])
    try:
        evaluation.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_split_test_scores_the_whole_test_split_with_the_hand_computed_loss(repeat_model, monkeypatch, capsys):
    code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], "--split", "test", "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    results = json.loads(out)
    assert "valid" not in results and results["context_length"] == 64 and results["stride"] == 32
    tokens = read_token_file(repeat_model["prepared"].token_files["test"])
    assert results["test"]["tokens"] == len(tokens) - 1
    assert results["test"]["loss"] == pytest.approx(hand_computed_loss(tokens), rel=1e-5)
    text = repeat_model["prepared"].text_files["test"].read_text(encoding="utf-8")
    assert results["test"]["bytes"] == len(text.encode("utf-8")) and results["test"]["words"] == len(text.split())


def test_split_valid_and_max_tokens_score_the_first_whole_lines_that_fit(repeat_model, monkeypatch, capsys):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(repeat_model["prepared"].tokenizer_path))
    lines = repeat_model["prepared"].text_files["valid"].read_text(encoding="utf-8").splitlines(keepends=True)
    three_lines, four_lines = "".join(lines[:3]), "".join(lines[:4])
    three, four = len(encode_text(processor, three_lines)), len(encode_text(processor, four_lines))
    for max_tokens in (three - 1, (three + four) // 2 - 1):  # exactly three lines, and three and half a line
        code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], "--split", "valid", "--max-tokens",
                                   str(max_tokens), "--json"], monkeypatch, capsys)
        assert code == 0, err
        results = json.loads(out)
        assert "test" not in results and results["max_tokens"] == max_tokens
        scored = results["valid"]
        assert scored["tokens"] == three - 1 and scored["bytes"] == len(three_lines.encode("utf-8"))
        assert scored["words"] == len(three_lines.split())
        assert scored["loss"] == pytest.approx(hand_computed_loss(encode_text(processor, three_lines)), rel=1e-5)
        assert scored["bits_per_byte"] == pytest.approx(scored["loss"] * scored["tokens"] / math.log(2)
                                                        / scored["bytes"], rel=1e-9)


def test_both_splits_by_default_with_a_progress_bar_on_stderr_and_only_json_on_stdout(repeat_model, monkeypatch,
                                                                                     capsys):
    code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 1 and set(json.loads(out)) >= {"valid", "test"}
    assert "windows of 64 tokens (the model's context) moving by 32" in err  # the choice, printed
    assert "valid: 100%" in err and "test: 100%" in err and "token/s" in err  # the bars, with their rate
    assert "weights and computation in float32" in err and "windows took" in err  # the precision, an estimate
    code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], "--max-tokens", "200"], monkeypatch, capsys)
    assert code == 0 and "valid: loss" in out and "test : loss" in out and "100%" not in out


@pytest.mark.parametrize("flag, values", [
    ("--split", ["train", "", "Test"]), ("--max-tokens", ["0", "-5", "nan", "1.5"]),
    ("--context-length", ["0", "-1", "x", "1000000000"]), ("--stride", ["0", "-2", "100000"]),
    ("--batch-size", ["0", "nan"]), ("--device", ["foo"]), ("--dtype", ["float16", "fp32", ""]),
])
def test_a_bad_value_of_any_eval_flag_is_one_line_and_a_non_zero_exit(repeat_model, monkeypatch, capsys, flag,
                                                                      values):
    for value in values:
        code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], flag, value], monkeypatch, capsys)
        assert code != 0 and out == "", (flag, value, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (flag, value, err)


def test_a_long_context_model_defaults_to_a_window_that_suits_the_device():
    model = Llama(LlamaConfig(vocab_size=64, context_length=8192, n_layers=1, n_heads=2, n_kv_heads=1, d_model=16))
    length, reason = evaluation.choose_context_length(model, torch.device("cpu"), None, 100_000)
    assert length == evaluation.LONGEST_DEFAULT_WINDOW["cpu"] and "8,192" in reason
    assert evaluation.choose_context_length(model, torch.device("cpu"), 300, 100_000) == (300, "--context-length")
    assert evaluation.choose_context_length(model, torch.device("cpu"), None, 500)[0] == 500  # a short text


def test_a_long_context_model_scores_windows_of_2048_moving_by_1536_on_a_cpu_and_ours_by_half_a_window():
    assert evaluation.LONGEST_DEFAULT_WINDOW["cpu"] == 2048 and evaluation.default_stride(2048) == 1536
    assert evaluation.default_stride(128) == 64 and evaluation.default_stride(1024) == 512  # half a window
    assert evaluation.default_stride(4096) == 4096 - evaluation.LEAST_CONTEXT


@pytest.mark.parametrize("tie", [True, False])
def test_scoring_from_hidden_states_a_few_positions_at_a_time_equals_the_models_own_logits(tie, monkeypatch):
    """final_hidden_states + output_logits is Llama.forward; the scored positions' losses, LOGITS_CHUNK at a time,
    sum to the cross-entropy of the whole forward pass's logits, window by window, for every stride."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                              tie_embeddings=tie)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 61)
    monkeypatch.setattr(evaluation, "LOGITS_CHUNK", 3)
    with torch.no_grad():
        block = torch.from_numpy(tokens[:17])[None]  # (1, 17)
        logits = model(block[:, :-1])[0]  # (1, 16, V)
        assert torch.allclose(evaluation.output_logits(model, evaluation.final_hidden_states(model, block[:, :-1])),
                              logits, atol=1e-6)
        for stride in (16, 10, 3):
            expected = 0.0
            for start, first_scored in evaluation.scoring_windows(60, 16, stride):
                window = torch.from_numpy(tokens[start : start + 17])[None]  # (1, 17)
                window_logits = model(window[:, :-1])[0][0, first_scored:]  # (scored, V)
                expected += float(torch.nn.functional.cross_entropy(window_logits, window[0, first_scored + 1 :],
                                                                    reduction="sum"))
            total, scored = evaluation.total_negative_log_likelihood(model, tokens, 16, 2, "cpu", stride)
            assert scored == 60 and total == pytest.approx(expected, rel=1e-5)


def test_windows_score_every_target_exactly_once():
    for count, length, stride in [(60, 16, 16), (60, 16, 10), (60, 16, 1), (16, 16, 8), (5, 16, 4), (2048 * 3 + 7,
                                                                                                    2048, 1536)]:
        windows = evaluation.scoring_windows(count, length, stride)
        window = min(length, count)
        targets = [start + position for start, first in windows for position in range(first, window)]
        assert sorted(targets) == list(range(count)), (count, length, stride)
        assert all(first == 0 or first >= window - stride for _, first in windows[1:])  # context: window - stride


def test_dtype_bfloat16_scores_a_checkpoint_close_to_float32_and_auto_keeps_float32(repeat_model, monkeypatch,
                                                                                    capsys):
    losses = {}
    for dtype in ("auto", "bfloat16"):
        code, out, err = run_eval(["--checkpoint", repeat_model["checkpoint"], "--split", "valid", "--max-tokens",
                                   "300", "--dtype", dtype, "--json"], monkeypatch, capsys)
        assert code == 0, err
        results = json.loads(out)
        losses[results["dtype"]] = results["valid"]["loss"]
    assert set(losses) == {"float32", "bfloat16"}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2) and losses["bfloat16"] != losses["float32"]
