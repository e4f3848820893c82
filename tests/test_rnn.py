"""The rnn chapter: the hand-written RNN and its BPTT equal torch.nn.RNN, padding is harmless, training works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnn import hello
from rnn.model import ClassifierConfig, HandwrittenRNN, NameClassifier, RNNLayerFunction, TorchRNN, clip_gradient_norm
from rnn.names import Alphabet, load_pairs, make_batch, stratified_split
from rnn.train import load_run_checkpoint, model_from_checkpoint
from rnn.vanishing import input_gradient_norms

REPO_ROOT = Path(__file__).resolve().parents[1]


def paired_rnns(num_layers, bidirectional, dtype=torch.float64):
    """A hand-written RNN and a torch.nn.RNN holding the very same (copied) weights."""
    reference = TorchRNN(5, 7, num_layers, bidirectional).to(dtype)
    handwritten = HandwrittenRNN(5, 7, num_layers, bidirectional).to(dtype)
    handwritten.load_state_dict(reference.state_dict())
    return handwritten, reference


def outputs_and_gradients(rnn, inputs, lengths, initial_hidden, output_weights, final_weights):
    """Run forward, backpropagate a random linear function of outputs and final state, collect everything."""
    inputs = inputs.clone().requires_grad_(True)
    initial_hidden = initial_hidden.clone().requires_grad_(True)
    outputs, final_hidden = rnn(inputs, lengths, initial_hidden)
    ((outputs * output_weights).sum() + (final_hidden * final_weights).sum()).backward()
    gradients = {name: parameter.grad for name, parameter in rnn.named_parameters()}
    return outputs, final_hidden, inputs.grad, initial_hidden.grad, gradients


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_handwritten_rnn_matches_torch_outputs_and_gradients(num_layers, bidirectional, padded):
    handwritten, reference = paired_rnns(num_layers, bidirectional)
    directions = 2 if bidirectional else 1
    inputs = torch.randn(4, 6, 5, dtype=torch.float64)  # (B, T, I)
    lengths = torch.tensor([6, 3, 1, 5]) if padded else None
    initial_hidden = torch.randn(num_layers * directions, 4, 7, dtype=torch.float64)
    output_weights = torch.randn(4, 6, 7 * directions, dtype=torch.float64)
    final_weights = torch.randn(num_layers * directions, 4, 7, dtype=torch.float64)
    mine = outputs_and_gradients(handwritten, inputs, lengths, initial_hidden, output_weights, final_weights)
    theirs = outputs_and_gradients(reference, inputs, lengths, initial_hidden, output_weights, final_weights)
    for name, a, b in zip(["outputs", "final hidden", "d inputs", "d initial hidden"], mine[:4], theirs[:4]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    assert mine[4].keys() == theirs[4].keys()
    for name in mine[4]:
        torch.testing.assert_close(mine[4][name], theirs[4][name], atol=1e-5, rtol=0, msg=name)


def test_handwritten_rnn_matches_torch_in_float32():
    handwritten, reference = paired_rnns(2, True, torch.float32)
    inputs, lengths = torch.randn(3, 9, 5), torch.tensor([9, 4, 2])
    initial_hidden, output_weights, final_weights = torch.randn(4, 3, 7), torch.randn(3, 9, 14), torch.randn(4, 3, 7)
    mine = outputs_and_gradients(handwritten, inputs, lengths, initial_hidden, output_weights, final_weights)
    theirs = outputs_and_gradients(reference, inputs, lengths, initial_hidden, output_weights, final_weights)
    for a, b in zip(mine[:4], theirs[:4]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for name in mine[4]:
        torch.testing.assert_close(mine[4][name], theirs[4][name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_handwritten_bptt_equals_autograd(reverse, masked):
    """The hand-written backward of one layer against torch.autograd.gradcheck (finite differences)."""
    inputs = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool) if masked else None
    initial_hidden = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    shapes = ((6, 4), (6, 6), (6,), (6,))
    weights = [(torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_(True) for shape in shapes]
    assert torch.autograd.gradcheck(
        lambda *args: RNNLayerFunction.apply(args[0], mask, args[1], *args[2:], reverse),
        (inputs, initial_hidden, *weights),
    )


def test_handwritten_bptt_equals_autograd_of_the_same_loop():
    """BPTT by hand == autograd through the plain forward equations written with differentiable torch ops."""
    inputs, initial_hidden = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    weights = [torch.randn(*shape, dtype=torch.float64) for shape in ((4, 3), (4, 4), (4,), (4,))]
    leaves = [t.clone().requires_grad_(True) for t in (inputs, initial_hidden, *weights)]
    outputs, final = RNNLayerFunction.apply(leaves[0], None, leaves[1], *leaves[2:], False)
    (outputs.pow(2).sum() + final.sum()).backward()
    by_hand = [leaf.grad for leaf in leaves]
    leaves = [t.clone().requires_grad_(True) for t in (inputs, initial_hidden, *weights)]
    x, hidden, weight_ih, weight_hh, bias_ih, bias_hh = leaves
    steps = []
    for t in range(x.shape[1]):
        hidden = torch.tanh(x[:, t] @ weight_ih.T + bias_ih + hidden @ weight_hh.T + bias_hh)
        steps.append(hidden)
    (torch.stack(steps, 1).pow(2).sum() + hidden.sum()).backward()
    for mine, theirs in zip(by_hand, [leaf.grad for leaf in leaves]):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", ["handwritten", "torch"])
def test_padding_does_not_change_real_positions(impl):
    """A name gives the same logits alone and padded in a batch beside a longer name."""
    torch.manual_seed(0)
    model = NameClassifier(ClassifierConfig(vocab_size=10, num_classes=3, embedding_size=4, hidden_size=6,
                                            num_layers=2, bidirectional=True, impl=impl)).double().eval()
    short = torch.tensor([[2, 3, 4]])
    batch = torch.tensor([[2, 3, 4, 0, 0, 0], [5, 6, 7, 8, 9, 2]])
    alone = model(short, torch.tensor([3]))
    padded = model(batch, torch.tensor([3, 6]))
    torch.testing.assert_close(alone[0], padded[0], atol=1e-12, rtol=0)
    rnn = model.rnn
    outputs_alone, _ = rnn(torch.randn(1, 3, 4, dtype=torch.float64), torch.tensor([3]))
    assert outputs_alone.shape == (1, 3, 12)
    garbage = torch.randn(2, 6, 4, dtype=torch.float64)
    clean = garbage.clone()
    clean[0, 3:] = 0
    torch.testing.assert_close(rnn(garbage, torch.tensor([3, 6]))[0], rnn(clean, torch.tensor([3, 6]))[0])
    assert rnn(garbage, torch.tensor([3, 6]))[0][0, 3:].abs().max() == 0


def test_same_seed_gives_same_initial_weights_in_both_impls():
    models = []
    for impl in ("handwritten", "torch"):
        torch.manual_seed(3)
        models.append(NameClassifier(ClassifierConfig(20, 5, 8, 16, 2, True, 0.1, impl)).state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])


def test_gradient_clipping_bounds_the_global_norm():
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    parameters[0].grad, parameters[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    reference = [p.grad.clone() for p in parameters]
    norm = clip_gradient_norm(parameters, 1.0)
    torch.testing.assert_close(norm, torch.sqrt(torch.tensor(27.0 + 64.0)))
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in parameters))
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(parameters[0].grad / parameters[1].grad[0], reference[0] / reference[1][0])


def test_split_is_stratified_deduplicated_and_seeded():
    pairs = load_pairs()
    assert len(pairs) == len(set(pairs)) == 18018
    splits = stratified_split(pairs, seed=0)
    assert splits == stratified_split(pairs, seed=0)
    assert sum(len(split) for split in splits.values()) == len(pairs)
    assert len({language for _, language in splits["test"]}) == 18
    russian = {name: sum(1 for _, language in splits[name] if language == "Russian") / len(splits[name])
               for name in splits}
    assert max(russian.values()) - min(russian.values()) < 0.01


def test_tiny_training_on_real_names_lowers_the_loss():
    torch.manual_seed(0)
    pairs = stratified_split(load_pairs(), seed=0)["train"][::40]  # ~360 names of every language
    languages = sorted({language for _, language in pairs})
    alphabet = Alphabet("".join(name for name, _ in pairs))
    character_ids, lengths = make_batch([name for name, _ in pairs], alphabet)
    labels = torch.tensor([languages.index(language) for _, language in pairs])
    model = NameClassifier(ClassifierConfig(len(alphabet), len(languages), 16, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(character_ids, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        clip_gradient_norm(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A two-epoch training run on 600 names, through the real CLI."""
    out_dir = tmp_path_factory.mktemp("rnn-run")
    arguments = ["--epochs", "2", "--limit", "600", "--hidden-size", "32", "--embedding-size", "16",
                 "--device", "cpu", "--no-progress", "--out-dir", str(out_dir)]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "rnn/train.py"), *arguments], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out_dir, arguments, result


@pytest.mark.slow
def test_training_cli_writes_checkpoints_that_round_trip(trained_run):
    out_dir, _, result = trained_run
    assert "test accuracy" in result.stdout
    assert (out_dir / "curves.png").is_file()
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2
    state = load_run_checkpoint(out_dir / "last.pt")
    model = model_from_checkpoint(state, "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    other = model_from_checkpoint(state, "cpu", impl="torch")  # the same weights load into torch.nn.RNN
    alphabet = Alphabet(state["alphabet"])
    ids, lengths = make_batch(["Nakamura", "Dostoevsky"], alphabet)
    torch.testing.assert_close(model.eval()(ids, lengths), other.eval()(ids, lengths), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(trained_run, run_cli):
    out_dir, arguments, _ = trained_run
    arguments = [a if a != "2" else "3" for a in arguments]
    result = run_cli("rnn/train.py", *arguments, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "epoch   3" in result.stdout and "epoch   1 " not in result.stdout
    assert load_run_checkpoint(out_dir / "last.pt")["epoch"] == 3


@pytest.mark.slow
def test_eval_cli_reports_json_and_predictions(trained_run, run_cli):
    out_dir = trained_run[0]
    result = run_cli("rnn/eval.py", "--checkpoint", str(out_dir / "best.pt"), "--json", "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    result = run_cli("rnn/eval.py", "--checkpoint", str(out_dir / "best.pt"), "--predict", "Dostoevsky", "Nakamura")
    assert result.returncode == 0, result.stderr
    assert "Dostoevsky" in result.stdout and "Nakamura" in result.stdout and "%" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("bad_name", ["", "Nak4mura!"])
def test_eval_rejects_empty_names_and_unknown_characters(trained_run, run_cli, bad_name):
    result = run_cli("rnn/eval.py", "--checkpoint", str(trained_run[0] / "best.pt"), "--predict", bad_name)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line(run_cli, tmp_path):
    missing = run_cli("rnn/eval.py", "--checkpoint", str(tmp_path / "missing.pt"))
    corrupt_path = tmp_path / "corrupt.pt"
    corrupt_path.write_bytes(b"not a checkpoint")
    corrupt = run_cli("rnn/eval.py", "--checkpoint", str(corrupt_path))
    no_resume = run_cli("rnn/train.py", "--resume", "--out-dir", str(tmp_path / "empty"), "--epochs", "1")
    for result in (missing, corrupt, no_resume):
        assert result.returncode != 0
        assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
    bad_flag = run_cli("rnn/train.py", "--hidden-size", "0")
    assert bad_flag.returncode != 0 and "Traceback" not in bad_flag.stderr


def test_gradient_vanishes_with_distance_under_default_init_and_less_with_orthogonal_weights():
    default = input_gradient_norms(hidden_size=64, steps=30, batch_size=8)  # (T,), index = distance from the loss
    orthogonal = input_gradient_norms(hidden_size=64, steps=30, batch_size=8, recurrent_gain=1.0)
    assert default[20] < 1e-4 * default[0]
    assert orthogonal[20] / orthogonal[0] > 100 * default[20] / default[0]


def test_hello_demo_learns_elloh(capsys):
    hello.main([])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("step  30") and line.endswith("'elloh'") for line in lines)
