"""The LSTM chapter: the hand-written LSTM equals torch.nn.LSTM, both tasks train, the CLIs fail clearly."""

import importlib
import json
import math
import subprocess

import pytest
import torch
from conftest import assert_one_line_error
from torch import nn
from torch.nn import functional as F

from lstm.model import (
    AddingConfig,
    AddingModel,
    CharConfig,
    CharLanguageModel,
    HandwrittenLSTM,
    LSTMLayerFunction,
    TorchRecurrent,
    generate,
    matching_rnn_hidden_size,
    recurrent_parameter_count,
)
from lstm.tasks import DEFAULT_BOOKS, adding_batch, load_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads on a busy machine


@pytest.fixture
def cli(run_cli):
    """conftest's run_cli with one thread per script."""

    def run(script, *arguments):
        return run_cli(script, *arguments, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    return run


@pytest.fixture
def in_process(capsys):
    """Run a chapter script's main(argv) in this process (no interpreter start-up): a CompletedProcess-alike."""

    def run(script, *arguments):
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        capsys.readouterr()
        code = 0
        try:
            module.main(list(arguments))
        except SystemExit as exit_:  # an uncaught exception would fail the test with its traceback
            code = exit_.code if isinstance(exit_.code, int) else 1
        stdout, stderr = capsys.readouterr()
        return subprocess.CompletedProcess([script, *arguments], code, stdout, stderr)

    return run


def copied_pair(input_size, hidden_size, num_layers, backward="handwritten", dtype=torch.float64):
    """torch.nn.LSTM (in the wrapper that packs variable lengths) and a hand-written LSTM with the same weights."""
    reference = TorchRecurrent("lstm", input_size, hidden_size, num_layers, 0.0).to(dtype)
    handwritten = HandwrittenLSTM(input_size, hidden_size, num_layers, backward=backward).to(dtype)
    handwritten.load_state_dict(reference.recurrent.state_dict())
    return reference, handwritten


def outputs_and_gradients(module, inputs, state, lengths=None):
    """Run a module, backprop a fixed random functional of everything it returns, collect all gradients."""
    inputs = inputs.clone().requires_grad_(True)
    state = tuple(part.clone().requires_grad_(True) for part in state)
    outputs, (hidden, cell) = module(inputs, state, lengths)
    weights = torch.Generator().manual_seed(1)
    loss = sum((tensor * torch.randn(tensor.shape, generator=weights, dtype=tensor.dtype)).sum()
               for tensor in (outputs, hidden, cell))
    loss.backward()
    gradients = {name.removeprefix("recurrent."): parameter.grad for name, parameter in module.named_parameters()}
    gradients["inputs"], gradients["h0"], gradients["c0"] = inputs.grad, state[0].grad, state[1].grad
    return outputs, hidden, cell, gradients


TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}  # atol = rtol, per dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backward", ["handwritten", "autograd"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_handwritten_lstm_matches_torch_outputs_state_and_all_gradients(num_layers, backward, dtype):
    reference, handwritten = copied_pair(5, 7, num_layers, backward, dtype)
    inputs = torch.randn(3, 11, 5, dtype=dtype)
    state = (torch.randn(num_layers, 3, 7, dtype=dtype), torch.randn(num_layers, 3, 7, dtype=dtype))
    expected = outputs_and_gradients(reference, inputs, state)
    actual = outputs_and_gradients(handwritten, inputs, state)
    tolerance = TOLERANCES[dtype]
    for want, got in zip(expected[:3], actual[:3]):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert expected[3].keys() == actual[3].keys()
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], atol=tolerance, rtol=tolerance,
                                   msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backward", ["handwritten", "autograd"])
def test_handwritten_lstm_with_variable_lengths_matches_packed_torch_lstm(backward, dtype):
    reference, handwritten = copied_pair(4, 6, 2, backward, dtype)
    inputs = torch.randn(4, 9, 4, dtype=dtype)
    lengths = torch.tensor([9, 3, 6, 1])
    state = (torch.randn(2, 4, 6, dtype=dtype), torch.randn(2, 4, 6, dtype=dtype))
    expected = outputs_and_gradients(reference, inputs, state, lengths)
    actual = outputs_and_gradients(handwritten, inputs, state, lengths)
    tolerance = TOLERANCES[dtype]
    for want, got in zip(expected[:3], actual[:3]):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert torch.all(actual[0][1, 3:] == 0), "outputs past a sequence's end are zero, as pad_packed_sequence gives"
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], atol=tolerance, rtol=tolerance,
                                   msg=f"gradient of {name}")


def two_layers_of_the_function(lengths, with_initial_state):
    """A 2-layer LSTM built from LSTMLayerFunction alone, as a function of every tensor gradcheck perturbs."""

    def run(inputs, *tensors):
        steps = inputs.shape[1]
        valid = (torch.arange(steps)[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
        if with_initial_state:
            hidden, cell, weights = tensors[0], tensors[1], tensors[2:]  # (2, B, H) each, then 2 x 4 weights
        else:
            zeros = inputs.new_zeros(2, inputs.shape[0], tensors[1].shape[1])  # weight_hh_l0: (4H, H)
            hidden, cell, weights = zeros, zeros, tensors
        outputs, hidden_0, cell_0 = LSTMLayerFunction.apply(inputs, valid, hidden[0], cell[0], *weights[:4])
        outputs, hidden_1, cell_1 = LSTMLayerFunction.apply(outputs, valid, hidden[1], cell[1], *weights[4:])
        return outputs, torch.stack([hidden_0, hidden_1]), torch.stack([cell_0, cell_1])

    return run


@pytest.mark.parametrize("with_initial_state", [True, False])
def test_lstm_layer_function_passes_gradcheck_in_float64(with_initial_state):
    """Input 5, hidden 7, batch 3, lengths 6, 2 and 4 of 6 steps, 2 layers: (9)-(11) against finite differences."""
    lstm = HandwrittenLSTM(5, 7, 2).double()
    weights = [parameter.detach().clone().requires_grad_(True) for parameter in lstm.parameters()]
    inputs = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    tensors = (inputs, *state, *weights) if with_initial_state else (inputs, *weights)
    function = two_layers_of_the_function(torch.tensor([6, 2, 4]), with_initial_state)
    # fast_mode compares, for every input and output, a random projection of the Jacobian (one directional
    # finite difference against one hand-written vector-Jacobian product) instead of all ~1,000 of its columns.
    assert torch.autograd.gradcheck(function, tensors, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_carrying_state_across_calls_equals_one_long_call():
    lstm = HandwrittenLSTM(3, 5, 2).double()
    inputs = torch.randn(2, 12, 3, dtype=torch.float64)
    whole, (hidden, cell) = lstm(inputs)
    first, state = lstm(inputs[:, :5])
    second, (hidden_carried, cell_carried) = lstm(inputs[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(hidden_carried, hidden)
    torch.testing.assert_close(cell_carried, cell)


def test_dropout_acts_between_layers_only_while_training():
    lstm = HandwrittenLSTM(3, 8, 2, dropout=0.5)
    inputs = torch.randn(2, 4, 3)
    lstm.eval()
    torch.testing.assert_close(lstm(inputs)[0], lstm(inputs)[0])
    lstm.train()
    assert not torch.allclose(lstm(inputs)[0], lstm(inputs)[0])


def test_handwritten_and_torch_language_models_start_from_identical_weights():
    models = []
    for impl in ("handwritten", "torch"):
        torch.manual_seed(3)
        models.append(CharLanguageModel(CharConfig(vocab_size=20, embedding_size=8, hidden_size=16, impl=impl)))
    tokens = torch.randint(0, 20, (2, 7))
    models[0].eval()
    models[1].eval()
    torch.testing.assert_close(models[0](tokens)[0], models[1](tokens)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["handwritten", "torch"])
def test_language_model_starts_with_forget_gate_bias_one_and_other_gates_untouched(impl):
    torch.manual_seed(3)
    model = CharLanguageModel(CharConfig(vocab_size=20, embedding_size=8, hidden_size=16, num_layers=2, impl=impl))
    torch.manual_seed(3)
    nn.Embedding(20, 8)  # the model draws its embedding first
    plain = nn.LSTM(8, 16, 2)  # then the recurrent weights: what the same draw gives without the forget-gate change
    biases = {name.rsplit(".", 1)[-1]: p for name, p in model.recurrent.named_parameters() if "bias" in name}
    for layer in range(2):
        ih, hh = biases[f"bias_ih_l{layer}"], biases[f"bias_hh_l{layer}"]
        assert torch.equal(ih[16:32] + hh[16:32], torch.ones(16))  # forget gate: sigma(1) at the start
        for rows in (slice(0, 16), slice(32, 64)):  # input, candidate, output gates keep torch's initialisation
            torch.testing.assert_close(ih[rows], getattr(plain, f"bias_ih_l{layer}")[rows].detach())
    rnn = CharLanguageModel(CharConfig(vocab_size=20, embedding_size=8, hidden_size=16, cell="rnn", impl="torch"))
    assert not any(torch.equal(p, torch.ones_like(p)) for name, p in rnn.named_parameters() if "bias" in name)


def test_adding_model_opens_its_forget_gates_only_when_asked():
    hidden = 4
    for impl in ("handwritten", "torch"):
        torch.manual_seed(0)
        closed = AddingModel(AddingConfig(hidden_size=hidden, impl=impl))
        torch.manual_seed(0)
        opened = AddingModel(AddingConfig(hidden_size=hidden, impl=impl, forget_bias=3.0))
        for (name, before), after in zip(closed.named_parameters(), opened.parameters()):
            if "bias_ih" in name:  # forget rows H..2H set to 3, the other gates as initialised
                assert torch.all(after[hidden : 2 * hidden] == 3.0)
                torch.testing.assert_close(after[:hidden], before[:hidden])
                torch.testing.assert_close(after[2 * hidden :], before[2 * hidden :])
            elif "bias_hh" in name:
                assert torch.all(after[hidden : 2 * hidden] == 0.0)
            else:
                torch.testing.assert_close(after, before)


def test_rnn_baseline_is_sized_to_the_lstm_parameter_count():
    hidden_size = matching_rnn_hidden_size(192, 64, 2, extra_per_hidden=82)
    lstm_total = recurrent_parameter_count("lstm", 64, 192, 2) + 82 * 192
    rnn_total = recurrent_parameter_count("rnn", 64, hidden_size, 2) + 82 * hidden_size
    assert abs(rnn_total - lstm_total) / lstm_total < 0.01
    rnn = CharLanguageModel(CharConfig(vocab_size=82, embedding_size=64, hidden_size=hidden_size, cell="rnn",
                                       impl="torch"))
    assert sum(p.numel() for p in rnn.recurrent.parameters()) == recurrent_parameter_count("rnn", 64, hidden_size, 2)


def test_generate_with_carried_state_matches_rerunning_the_whole_text():
    model = CharLanguageModel(CharConfig(vocab_size=12, embedding_size=6, hidden_size=10, num_layers=2)).eval()
    sampled = list(generate(model, [1, 2, 3], 6, temperature=0.8, generator=torch.Generator().manual_seed(0)))
    assert len(sampled) == 6 and all(0 <= token < 12 for token in sampled)
    # Rebuild the same sample without carrying state: rerun the whole text each step with the same random draws.
    generator, text = torch.Generator().manual_seed(0), [1, 2, 3]
    for _ in range(6):
        logits = model(torch.tensor([text]))[0][0, -1]
        text.append(torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator).item())
    assert text[3:] == sampled


def test_adding_batch_marks_one_value_in_each_half_and_targets_their_sum():
    inputs, targets = adding_batch(8, 20, torch.Generator().manual_seed(0))
    assert inputs.shape == (8, 20, 2)
    markers = inputs[..., 1]
    assert torch.all(markers[:, :10].sum(1) == 1) and torch.all(markers[:, 10:].sum(1) == 1)
    torch.testing.assert_close((inputs[..., 0] * markers).sum(1), targets)
    assert AddingModel(AddingConfig(hidden_size=4))(inputs).shape == (8,)


def test_corpus_holds_out_the_end_of_each_book():
    corpus = load_corpus()
    assert corpus.test.endswith("THE END\n\n\n")  # the end of Sense and Sensibility, the last book
    assert "FINIS" in corpus.test and "FINIS" not in corpus.train
    assert len(corpus.validation) > 50_000 and len(corpus.test) > 50_000
    assert corpus.decode(corpus.encode("Emma")) == "Emma"
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        corpus.encode("Emma \u00e9")


TINY_LM = ["--hidden-size", "32", "--num-layers", "2", "--embedding-size", "16", "--seq-len", "50",
           "--batch-size", "16", "--lr", "1e-2", "--eval-every", "20"]


@pytest.mark.slow
def test_tiny_language_model_trains_checkpoints_resumes_and_evaluates(in_process, tmp_path):
    out_dir = tmp_path / "lm"
    trained = in_process("lstm/train.py", *TINY_LM, "--steps", "40", "--out-dir", str(out_dir))
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["validation_bpc"] < records[0]["validation_bpc"] < 6.4  # log2(82) = 6.36: it learns
    assert (out_dir / "best.pt").is_file() and (out_dir / "last.pt").is_file() and (out_dir / "curves.png").is_file()

    evaluated = in_process("lstm/eval.py", "--checkpoint", str(out_dir / "best.pt"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_bpc"] == pytest.approx(summary["test_bpc"], abs=1e-4)

    sampled = in_process("lstm/eval.py", "--checkpoint", str(out_dir / "best.pt"), "--sample", "--prompt", "Emma",
                      "--length", "40", "--temperature", "0.8")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("Emma") and len(sampled.stdout.rstrip("\n")) == 44

    compared = in_process("lstm/compare.py", str(out_dir), "--out", str(tmp_path / "curves.png"),
                          "--context-out", str(tmp_path / "context.png"), "--window", "50")
    assert compared.returncode == 0, compared.stderr
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "context.png").is_file()
    context_row = compared.stdout.splitlines()[-2].split("|")[2:-1]  # bpc at 0, 1, 2-4, 5-9, 10-19, 20-49
    assert len(context_row) == 6 and float(context_row[0]) > float(context_row[-1])  # context helps

    resumed = in_process("lstm/train.py", *TINY_LM, "--steps", "40", "--out-dir", str(out_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr  # a finished run resumes to its end at once and scores again
    assert "resumed from step 40" in resumed.stdout
    assert json.loads((out_dir / "summary.json").read_text())["test_bpc"] == summary["test_bpc"]


def test_each_cell_gets_its_own_default_learning_rate_unless_one_is_given():
    from lstm.train import DEFAULT_LEARNING_RATES, parse_args

    assert parse_args([]).lr == DEFAULT_LEARNING_RATES["lstm"]
    assert parse_args(["--cell", "rnn"]).lr == DEFAULT_LEARNING_RATES["rnn"] < DEFAULT_LEARNING_RATES["lstm"]
    assert parse_args(["--cell", "rnn", "--lr", "0.03"]).lr == 0.03


def test_loss_by_position_reads_each_window_from_a_zero_state():
    from lstm.eval import loss_by_position

    torch.manual_seed(0)
    model = CharLanguageModel(CharConfig(vocab_size=10, embedding_size=4, hidden_size=6, num_layers=2))
    ids = torch.randint(0, 10, (3 * 7 + 2,))  # room for windows of 7 starting at 0, 3, ..., 15
    curve = loss_by_position(model, ids, window=7, stride=3, batch_size=4)  # batches of four windows, then two
    with torch.no_grad():
        model.eval()
        per_window = [F.cross_entropy(model(ids[None, start : start + 7])[0][0], ids[start + 1 : start + 8],
                                      reduction="none") for start in range(0, 16, 3)]  # each (7,), zero state
    torch.testing.assert_close(curve, torch.stack(per_window).mean(0) / math.log(2))


def test_checkpoint_round_trip_gives_the_same_model(tmp_path):
    from lstm.eval import load_language_model
    from lstm.train import save_checkpoint

    config = CharConfig(vocab_size=82, embedding_size=8, hidden_size=12, num_layers=2)
    model = CharLanguageModel(config).eval()
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": model.config_dict(), "step": 1,
                                           "vocabulary": load_corpus().vocabulary, "books": []})
    loaded, _ = load_language_model(tmp_path / "best.pt", torch.device("cpu"))
    tokens = torch.randint(0, 82, (2, 9))
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0])


def test_tiny_adding_run_beats_the_trivial_answer(in_process, tmp_path):
    result = in_process("lstm/train.py", "--task", "adding", "--lengths", "10", "--cells", "lstm", "rnn",
                     "--adding-steps", "150", "--adding-hidden-size", "16", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lstm_run = next(run for run in runs if run["cell"] == "lstm")
    assert lstm_run["final_mse"] < 0.14  # the trivial answer 1.0 scores 1/6 = 0.167
    assert (tmp_path / "adding.png").is_file() and (tmp_path / "adding-lstm-10-last.pt").is_file()


def test_adding_resume_accepts_a_checkpoint_older_than_forget_bias_and_refuses_another_bias(in_process, tmp_path):
    from lstm.train import save_checkpoint

    tiny = ["--task", "adding", "--lengths", "6", "--cells", "lstm", "--adding-hidden-size", "4",
            "--out-dir", str(tmp_path)]
    assert in_process("lstm/train.py", *tiny, "--adding-steps", "2").returncode == 0
    last = tmp_path / "adding-lstm-6-last.pt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["config"]["forget_bias"]  # as saved before the option existed
    del checkpoint["train_arguments"]  # and before checkpoints kept the run's fixed arguments
    save_checkpoint(last, checkpoint)
    resumed = in_process("lstm/train.py", *tiny, "--adding-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    before = last.read_bytes()
    refused = in_process("lstm/train.py", *tiny, "--adding-steps", "3", "--resume", "--adding-forget-bias", "3")
    assert_one_line_error(refused, "--adding-forget-bias was 0.0 in the saved run and is 3.0 now")
    assert last.read_bytes() == before


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A language-model checkpoint written without training, for the CLI's error paths."""
    from lstm.train import save_checkpoint

    path = tmp_path_factory.mktemp("lstm") / "best.pt"
    corpus = load_corpus()
    model = CharLanguageModel(CharConfig(vocab_size=len(corpus.vocabulary), embedding_size=4, hidden_size=4))
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config_dict(), "step": 0,
                           "vocabulary": corpus.vocabulary, "books": list(DEFAULT_BOOKS)})
    return path


@pytest.mark.slow
def test_eval_rejects_an_empty_prompt(cli, tiny_checkpoint):
    result = cli("lstm/eval.py", "--checkpoint", str(tiny_checkpoint), "--sample", "--prompt", "")
    assert_one_line_error(result, "prompt is empty")


def test_eval_rejects_a_prompt_with_an_unknown_character(in_process, tiny_checkpoint):
    result = in_process("lstm/eval.py", "--checkpoint", str(tiny_checkpoint), "--sample", "--prompt", "Emma \u00e9")
    assert_one_line_error(result, "not in the model's vocabulary")


@pytest.mark.slow
def test_eval_reports_a_missing_checkpoint(cli, tmp_path):
    assert_one_line_error(cli("lstm/eval.py", "--checkpoint", str(tmp_path / "missing.pt")), "does not exist")


def test_eval_reports_a_corrupt_checkpoint(in_process, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(in_process("lstm/eval.py", "--checkpoint", str(tmp_path / "broken.pt")), "not a readable")


def test_resume_from_a_checkpoint_without_training_state_fails_without_touching_it(in_process, tmp_path,
                                                                                    tiny_checkpoint):
    last = tmp_path / "last.pt"
    last.write_bytes(tiny_checkpoint.read_bytes())  # weights and config, but no optimizer: not resumable
    before = last.read_bytes()
    result = in_process("lstm/train.py", "--out-dir", str(tmp_path), "--resume", "--steps", "1")
    assert_one_line_error(result, "is not a readable lstm checkpoint")
    assert last.read_bytes() == before


def test_bench_rejects_a_malformed_size(in_process):
    assert_one_line_error(in_process("lstm/bench.py", "--sizes", "64x100"), "batch x length x hidden x layers")


def test_gradient_flow_reports_missing_adding_checkpoints(in_process, tmp_path):
    assert_one_line_error(in_process("lstm/gradient_flow.py", "--run-dir", str(tmp_path)), "does not exist")
