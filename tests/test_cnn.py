"""Tests of the CNN chapter: every hand-written backward, the no-autograd step, training, checkpoints, the CLIs."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error

import cnn.eval as cnn_eval
from cnn import layers
from cnn.eval import load_model
from cnn.mnist import MnistError, load_split, read_idx
from cnn.model import CNNConfig, build_model, manual_forward_backward, manual_training_step
from cnn.runs import CheckpointError
from cnn.train import main as train_main
from cnn.train import parse_arguments, train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for the CLI subprocesses

pytestmark = pytest.mark.usefixtures("one_thread")


# (batch, in channels, height, width, out channels, kernel, stride, padding): odd sizes, strides that do not
# divide the input, padding larger than zero, a 1x1 kernel, and the model's own two layers (scaled down)
CONV_SHAPES = [
    (2, 1, 7, 7, 3, 3, 1, 0),
    (2, 3, 8, 6, 4, 3, 2, 1),
    (1, 2, 9, 7, 3, 5, 2, 2),
    (2, 2, 6, 5, 2, 1, 3, 0),
    (1, 3, 10, 10, 2, 4, 3, 1),
    (2, 1, 12, 12, 4, 5, 1, 2),
]


@pytest.mark.parametrize("method", ["col2im", "rot180"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_handwritten_conv2d_passes_gradcheck(shape, method):
    batch, in_channels, height, width, out_channels, kernel, stride, padding = shape
    images = torch.randn(batch, in_channels, height, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_channels, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layers.Conv2dFunction.apply(x, w, b, stride, padding, method), (images, weight, bias)
    )


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_handwritten_conv2d_matches_torch_forward_and_gradients(shape):
    batch, in_channels, height, width, out_channels, kernel, stride, padding = shape
    images = torch.randn(batch, in_channels, height, width, requires_grad=True)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, requires_grad=True)
    bias = torch.randn(out_channels, requires_grad=True)
    ours = layers.Conv2dFunction.apply(images, weight, bias, stride, padding)
    reference = F.conv2d(images, weight, bias, stride, padding)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(reference)
    our_gradients = torch.autograd.grad(ours, (images, weight, bias), upstream)
    reference_gradients = torch.autograd.grad(reference, (images, weight, bias), upstream)
    for mine, theirs in zip(our_gradients, reference_gradients):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_rot180_and_col2im_input_gradients_are_the_same_sum():
    images = torch.randn(3, 4, 11, 9, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    _, cache = layers.conv2d_forward(images, weight, torch.zeros(5, dtype=torch.float64), 2, 1)
    delta = torch.randn(3, 5, 6, 5, dtype=torch.float64)
    by_rotation, _, _ = layers.conv2d_backward(delta, cache, True, "rot180")
    by_col2im, _, _ = layers.conv2d_backward(delta, cache, True, "col2im")
    torch.testing.assert_close(by_rotation, by_col2im)


# (shape, kernel, stride): non-overlapping, overlapping (kernel 3, stride 2) and sizes the stride does not divide
POOL_SHAPES = [((2, 3, 8, 8), 2, 2), ((1, 2, 7, 9), 3, 2), ((2, 1, 5, 5), 2, 2), ((1, 2, 9, 6), 3, 3)]


@pytest.mark.parametrize("shape,kernel,stride", POOL_SHAPES)
@pytest.mark.parametrize("function", [layers.MaxPool2dFunction, layers.AvgPool2dFunction])
def test_handwritten_pooling_passes_gradcheck(function, shape, kernel, stride):
    images = torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # distinct values: no ties in a max
    assert torch.autograd.gradcheck(lambda x: function.apply(x, kernel, stride), (images,))


@pytest.mark.parametrize("shape,kernel,stride", POOL_SHAPES)
def test_handwritten_pooling_matches_torch_forward_and_gradients(shape, kernel, stride):
    for ours, theirs in [(layers.MaxPool2dFunction, F.max_pool2d), (layers.AvgPool2dFunction, F.avg_pool2d)]:
        images = torch.randn(*shape, requires_grad=True)
        mine = ours.apply(images, kernel, stride)
        reference = theirs(images, kernel, stride)
        torch.testing.assert_close(mine, reference)
        upstream = torch.randn_like(reference)
        torch.testing.assert_close(torch.autograd.grad(mine, images, upstream)[0],
                                   torch.autograd.grad(reference, images, upstream)[0])


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 3)])
def test_handwritten_relu_and_dropout_pass_gradcheck(shape):
    values = torch.randn(*shape, dtype=torch.float64)
    values = (values + 0.1 * values.sign()).requires_grad_()  # keep away from the kink at 0
    assert torch.autograd.gradcheck(layers.ReLUFunction.apply, (values,))
    # a fresh generator with the same seed on every call: gradcheck sees the same dropout mask each time
    assert torch.autograd.gradcheck(
        lambda x: layers.DropoutFunction.apply(x, 0.5, torch.Generator().manual_seed(3)), (values,)
    )
    torch.testing.assert_close(layers.ReLUFunction.apply(values), torch.relu(values))


@pytest.mark.parametrize("batch,inputs,outputs", [(1, 3, 2), (4, 7, 5), (5, 16, 10)])
def test_handwritten_linear_and_cross_entropy_pass_gradcheck_and_match_torch(batch, inputs, outputs):
    features = torch.randn(batch, inputs, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(outputs, inputs, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(outputs, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, outputs, (batch,))
    assert torch.autograd.gradcheck(layers.LinearFunction.apply, (features, weight, bias))
    logits = layers.LinearFunction.apply(features, weight, bias)
    detached_logits = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: layers.CrossEntropyFunction.apply(z, labels), (detached_logits,))
    torch.testing.assert_close(logits, F.linear(features, weight, bias))
    ours = layers.CrossEntropyFunction.apply(logits, labels)
    reference = F.cross_entropy(F.linear(features, weight, bias), labels)
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(torch.autograd.grad(ours, (features, weight, bias)),
                            torch.autograd.grad(reference, (features, weight, bias))):
        torch.testing.assert_close(mine, theirs)


def small_batch(size=16):
    """Real digits: the first `size` training images and labels."""
    return load_split("train", limit=size)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_handwritten_cnn_matches_torch_cnn_outputs_and_gradients(pooling):
    config = CNNConfig(dropout=0.0, pooling=pooling)
    handwritten, reference = build_model(config, "handwritten", seed=1), build_model(config, "torch", seed=7)
    reference.load_state_dict(handwritten.state_dict())  # copy the weights across
    images, labels = small_batch()
    our_loss = handwritten.loss(handwritten(images), labels)
    reference_loss = reference.loss(reference(images), labels)
    torch.testing.assert_close(our_loss, reference_loss)
    our_loss.backward()
    reference_loss.backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in handwritten.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_parameters[name].grad, rtol=1e-4, atol=1e-5)


def test_no_autograd_step_equals_autograd_step():
    config = CNNConfig(dropout=0.5)
    manual = build_model(config, "handwritten", seed=2)
    automatic = build_model(config, "handwritten", seed=2)
    optimizer = torch.optim.SGD(automatic.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    velocities = {name: torch.zeros_like(p) for name, p in manual.named_parameters()}
    images, labels = small_batch(32)
    for step in range(3):  # three steps, so that the momentum buffers matter
        batch = slice(step * 8, step * 8 + 16)
        torch.manual_seed(step)  # the same dropout mask on both paths
        manual_loss = manual_training_step(manual, images[batch], labels[batch], velocities, 0.05, 0.9, 5e-4)
        torch.manual_seed(step)
        automatic_loss = automatic.loss(automatic(images[batch]), labels[batch])
        optimizer.zero_grad()
        automatic_loss.backward()
        optimizer.step()
        torch.testing.assert_close(manual_loss, automatic_loss.detach())
    automatic_parameters = dict(automatic.named_parameters())
    for name, parameter in manual.named_parameters():
        torch.testing.assert_close(parameter, automatic_parameters[name], rtol=1e-5, atol=1e-6)


def test_no_autograd_gradients_equal_torch_nn_gradients():
    config = CNNConfig(dropout=0.0)
    manual, reference = build_model(config, "handwritten", seed=3), build_model(config, "torch", seed=3)
    images, labels = small_batch()
    loss, _, gradients = manual_forward_backward(manual, images, labels)
    reference_loss = reference.loss(reference(images), labels)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss.detach())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, rtol=1e-4, atol=1e-5)


def tiny_run_arguments(out_dir, *extra):
    """A few hundred real digits, small batches: seconds of CPU."""
    fixed = ["--train-images", "384", "--validation-images", "300", "--batch-size", "32", "--epochs", "2"]
    fixed += ["--warmup-steps", "5", "--log-every", "4", "--augment-shift", "0", "--out-dir", str(out_dir)]
    return parse_arguments([*fixed, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("backprop", ["autograd", "manual"])
def test_tiny_training_run_on_real_digits_beats_chance(tmp_path, backprop):
    record, finished = train(tiny_run_arguments(tmp_path, "--backprop", backprop))
    assert finished and record["validation_accuracy"] > 0.6  # chance is 0.1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train_loss"] for line in lines if line["kind"] == "step"]
    assert losses[-1] < losses[0]
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists() and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_checkpoint_round_trip_through_eval_cli(tmp_path, run_cli):
    train(tiny_run_arguments(tmp_path, "--impl", "torch"))
    result = run_cli("cnn/eval.py", "--checkpoint", str(tmp_path / "best.pt"), "--test-images", "500", "--json",
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["test_accuracy"] > 0.6 and metrics["test_loss"] > 0 and metrics["impl"] == "torch"
    for name in ["confusion", "predictions", "misclassified", "filters", "feature_maps_block1"]:
        assert (tmp_path / "first-500-test-images" / f"{name}.png").exists()  # a part of the test set: own folder
        assert not (tmp_path / f"{name}.png").exists()


def test_eval_refuses_a_figures_folder_it_cannot_create_before_evaluating(tmp_path, capsys, monkeypatch):
    train(tiny_run_arguments(tmp_path, "--impl", "torch", "--epochs", "1"))
    before = sorted(path.name for path in tmp_path.iterdir())

    def no_work(*arguments):
        raise AssertionError("evaluated before the figures folder was checked")

    monkeypatch.setattr(cnn_eval, "evaluate", no_work)
    with pytest.raises(SystemExit) as exit_info:
        cnn_eval.main(["--checkpoint", str(tmp_path / "best.pt"), "--figures-dir", str(tmp_path / "best.pt" / "below"),
                       "--test-images", "50"])
    message = str(exit_info.value.code)
    assert message.startswith("error: cannot create the figures folder") and len(message.splitlines()) == 1
    assert "Traceback" not in capsys.readouterr().err and sorted(path.name for path in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_eval_cli_with_missing_checkpoint_gives_one_clear_error(run_cli, tmp_path):
    assert_one_line_error(run_cli("cnn/eval.py", "--checkpoint", str(tmp_path / "missing.pt"), env=ONE_THREAD))


@pytest.mark.slow
def test_corrupt_checkpoint_and_idx_files_give_one_clear_error(run_cli, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable cnn checkpoint"):
        load_model(tmp_path / "broken.pt", torch.device("cpu"))
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")  # a header cut short
    with pytest.raises(MnistError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    assert_one_line_error(run_cli("cnn/train.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                                 env=ONE_THREAD))


@pytest.mark.slow
def test_train_cli_rejects_bad_flags_and_a_resume_without_checkpoint(run_cli, tmp_path):
    result = run_cli("cnn/train.py", "--epochs", "0", env=ONE_THREAD)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--epochs" in result.stderr
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", "--out-dir", str(tmp_path / "empty"), "--train-images", "64"])
    assert exit_info.value.code == f"error: --resume: {tmp_path / 'empty' / 'last.pt'} does not exist"
