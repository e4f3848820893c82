"""Run handling of the CNN chapter: Ctrl-C then --resume is exact (dropout and augmentation on, both backprop
paths), runs are never overwritten, a diverging loss writes nothing, and every bad flag or file of every CLI ends in
one line with the run folder untouched."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, folder_bytes, logged, refused, sigint_on_call, stopped_by_ctrl_c, torch_threads

import cnn.eval as eval_module
import cnn.model as model_module
import cnn.train as train_module
from cnn import bench
from cnn.mnist import load_split
from cnn.runs import EXIT_INTERRUPTED, check_run_folder, remove_run_files

REPO_ROOT = Path(__file__).resolve().parents[1]
# 2 epochs of 12 steps, dropout 0.5 and random shifts of up to 2 pixels on; a training-loss record every 4 steps
TINY = ["--train-images", "384", "--validation-images", "300", "--batch-size", "32", "--epochs", "2",
        "--warmup-steps", "5", "--log-every", "4", "--augment-shift", "2", "--dropout", "0.5"]
TORCH_RUN = [*TINY, "--impl", "torch"]
MANUAL_RUN = [*TINY, "--impl", "handwritten", "--backprop", "manual"]
COUNTERS = ("epoch", "batch_in_epoch")  # where a cnn checkpoint stands

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached_splits():
    """The MNIST splits, parsed once for the module (each run would otherwise parse the IDX files again)."""
    return {split: load_split(split) for split in ("train", "validation")}


def cached_load_split(cached_splits):
    def load(split, folder=None, limit=0):
        images, labels = cached_splits[split]
        return (images[:limit], labels[:limit]) if limit else (images, labels)

    return load


@pytest.fixture(autouse=True)
def fast_data(monkeypatch, cached_splits):
    monkeypatch.setattr(train_module, "load_split", cached_load_split(cached_splits))


def straight(tmp_path_factory, cached_splits, arguments):
    """The reference: a tiny run, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "load_split", cached_load_split(cached_splits))
        train_module.main([*arguments, "--out-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def straight_torch(tmp_path_factory, cached_splits):
    return straight(tmp_path_factory, cached_splits, TORCH_RUN)


@pytest.fixture(scope="module")
def straight_manual(tmp_path_factory, cached_splits):
    return straight(tmp_path_factory, cached_splits, MANUAL_RUN)


def stopped_at(capsys) -> int:
    output = capsys.readouterr().out
    found = re.search(r"stopped at step (\d+); resume with: python cnn/train.py --out-dir \S+ --resume", output)
    assert found, output
    return int(found[1])


@pytest.mark.slow
def test_ctrl_c_inside_the_optimizer_step_after_augmentation_and_at_an_epoch_boundary_resumes_exactly(
    straight_torch, tmp_path, monkeypatch, capsys
):
    out = ["--out-dir", str(tmp_path / "run")]
    with monkeypatch.context() as patch:  # inside step 3's optimizer step
        sigint_on_call(patch, torch.optim.SGD, "step", 3)
        stopped_by_ctrl_c(train_module.main, [*TORCH_RUN, *out])
    assert stopped_at(capsys) == 3
    with monkeypatch.context() as patch:  # step 7: its shifts are drawn, its dropout and update not yet
        sigint_on_call(patch, train_module, "random_shift", 4, after=True)
        stopped_by_ctrl_c(train_module.main, [*TORCH_RUN, *out, "--resume"])
    assert stopped_at(capsys) == 7
    with monkeypatch.context() as patch:  # just after epoch 1's validation has saved and drawn its curves
        sigint_on_call(patch, train_module, "plot_curves", 1, after=True)
        stopped_by_ctrl_c(train_module.main, [*TORCH_RUN, *out, "--resume"])
    assert stopped_at(capsys) == 12
    train_module.main([*TORCH_RUN, *out, "--resume"])
    assert_same_run(tmp_path / "run", straight_torch, counters=COUNTERS)


@pytest.mark.slow
def test_ctrl_c_after_the_no_autograd_backward_and_inside_validation_resumes_exactly(
    straight_manual, tmp_path, monkeypatch, capsys
):
    out = ["--out-dir", str(tmp_path / "run")]
    with monkeypatch.context() as patch:  # step 5: dropout drawn and gradients computed, the update not yet made
        sigint_on_call(patch, model_module, "manual_forward_backward", 5, after=True)
        stopped_by_ctrl_c(train_module.main, [*MANUAL_RUN, *out])
    assert stopped_at(capsys) == 5
    with monkeypatch.context() as patch:  # inside epoch 1's validation
        sigint_on_call(patch, train_module, "evaluate", 1)
        stopped_by_ctrl_c(train_module.main, [*MANUAL_RUN, *out, "--resume"])
    assert stopped_at(capsys) == 12
    assert [record["kind"] for record in logged(tmp_path / "run")][-1] == "epoch"
    train_module.main([*MANUAL_RUN, *out, "--resume"])
    assert_same_run(tmp_path / "run", straight_manual, counters=COUNTERS)


@pytest.mark.slow
def test_a_real_ctrl_c_from_outside_stops_cleanly_and_resumes_exactly(straight_torch, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "cnn/train.py", *TORCH_RUN, "--out-dir", str(out)], cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # just after the first training-loss record (step 4)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in stderr, stderr
    found = re.search(r"stopped at step (\d+); resume with: python cnn/train.py --out-dir (\S+) --resume", stdout)
    assert found and 4 <= int(found[1]) < 24 and found[2] == str(out), stdout
    train_module.main([*TORCH_RUN, "--out-dir", str(out), "--resume"])
    assert_same_run(out, straight_torch, counters=COUNTERS)


def test_a_folder_that_holds_a_run_is_refused_and_overwrite_replaces_only_its_files(straight_torch, tmp_path):
    before = folder_bytes(straight_torch)
    with pytest.raises(SystemExit) as refused:
        train_module.main([*TORCH_RUN, "--out-dir", str(straight_torch)])
    assert refused.value.code == (
        f"error: {straight_torch} already holds a run (last.pt); pass --resume to continue it, --out-dir DIR to "
        "start a new run elsewhere, or --overwrite to replace it")
    with pytest.raises(SystemExit, match="pass only one"):
        train_module.main([*TORCH_RUN, "--out-dir", str(straight_torch), "--resume", "--overwrite"])
    for flag, saved, value in [("--seed", "0", "1"), ("--batch-size", "32", "64"), ("--epochs", "2", "3"),
                               ("--augment-shift", "2", "1")]:
        with pytest.raises(SystemExit) as refused:
            train_module.main([*TORCH_RUN, "--out-dir", str(straight_torch), "--resume", flag, value])
        assert refused.value.code == (f"error: {flag} was {saved} in the saved run and is {value} now; "
                                      "a resumed run keeps its settings (start a new run with --out-dir)")
    assert folder_bytes(straight_torch) == before
    copy = tmp_path / "copy"
    shutil.copytree(straight_torch, copy)
    (copy / "notes.txt").write_text("mine")
    check_run_folder(copy, resume=False, overwrite=True)
    remove_run_files(copy, train_module.RUN_FILES)
    assert sorted(path.name for path in copy.iterdir()) == ["notes.txt"]
    train_module.main([*TORCH_RUN, "--out-dir", str(copy), "--overwrite"])
    assert_same_run(copy, straight_torch, counters=COUNTERS)


@pytest.mark.slow
def test_a_non_finite_loss_stops_before_any_write(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        sigint_on_call(patch, torch.optim.SGD, "step", 3)
        stopped_by_ctrl_c(train_module.main, [*TORCH_RUN, "--out-dir", str(run)])
    assert stopped_at(capsys) == 3
    before = folder_bytes(run)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "cross_entropy", lambda *arguments, **keywords: torch.tensor(float("nan")))
        with pytest.raises(SystemExit) as diverged:
            train_module.main([*TORCH_RUN, "--out-dir", str(run), "--resume", "--threads", "2"])
        assert diverged.value.code == (f"error: the training loss is not finite at step 4; stopped without saving: "
                                       f"{run / 'last.pt'} (step 3) holds the last good state")
        with pytest.raises(SystemExit, match="at step 1; stopped without saving: no checkpoint was written yet"):
            train_module.main([*TORCH_RUN, "--out-dir", str(tmp_path / "fresh")])
    assert folder_bytes(run) == before and not (tmp_path / "fresh" / "last.pt").exists()
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "evaluate", lambda *arguments: (float("nan"), 0.5))
        with pytest.raises(SystemExit) as diverged:
            train_module.main([*TORCH_RUN, "--out-dir", str(run), "--resume", "--threads", "2"])
        assert diverged.value.code == (f"error: the validation loss is not finite at step 12; stopped without "
                                       f"saving: {run / 'last.pt'} (step 3) holds the last good state")
    after = folder_bytes(run)
    assert after["last.pt"] == before["last.pt"] and "best.pt" not in after and "curves.png" not in after
    assert all(record["kind"] == "step" for record in logged(run))


# every numeric flag of every CLI with values its range refuses (0 only where 0 is not allowed, huge only where it
# does not fit); any of them that were accepted would train, evaluate or time, and change the run folder
TRAIN_REFUSED = {
    "--epochs": ["0", "-1", "nan", "1.5"], "--batch-size": ["0", "-1", "nan", "10000000"],
    "--lr": ["0", "-1", "nan", "inf"], "--warmup-steps": ["-1", "nan"], "--momentum": ["-1", "nan", "1"],
    "--weight-decay": ["-1", "nan", "inf"], "--dropout": ["-1", "nan", "1"], "--augment-shift": ["-1", "nan", "1000"],
    "--train-images": ["-1", "nan"], "--validation-images": ["-1", "nan"], "--log-every": ["0", "-1", "nan"],
    "--seed": ["-1", "nan", str(2**64)], "--device": ["foo"],
}
EVAL_REFUSED = {"--test-images": ["-1", "nan"], "--device": ["foo"]}
BENCH_REFUSED = {"--batch-size": ["0", "-1", "nan", "10000000"], "--repeats": ["0", "-1", "nan"],
                 "--epoch-images": ["-1", "nan", "10000000"]}


def test_every_cli_refuses_out_of_range_flags_and_unreadable_checkpoints_with_one_line(straight_torch, tmp_path,
                                                                                        capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_torch, run)
    before = folder_bytes(run)
    for flag, values in TRAIN_REFUSED.items():
        for value in values:
            refused(train_module.main, [*TORCH_RUN, "--out-dir", str(run), "--resume", flag, value], capsys)
    for flag, values in EVAL_REFUSED.items():
        for value in values:
            refused(eval_module.main, ["--checkpoint", str(run / "best.pt"), flag, value], capsys)
    for flag, values in BENCH_REFUSED.items():
        for value in values:
            refused(bench.main, [flag, value], capsys)
    a_file = run / "metrics.jsonl"
    refused(train_module.main, [*TORCH_RUN, "--out-dir", str(a_file)], capsys)
    refused(train_module.main, [*TORCH_RUN, "--out-dir", str(a_file / "below")], capsys)
    refused(eval_module.main, ["--checkpoint", str(run / "best.pt"), "--figures-dir", str(a_file)], capsys)
    assert folder_bytes(run) == before

    real = (run / "last.pt").read_bytes()
    garbage = {"empty": b"", "text": b"not a checkpoint\n", "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
               "truncated": real[: len(real) // 2]}
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"model": {}, "run_settings": {}, "pickled": Path("x")}, tmp_path / "pickled.pt")
    for name, content in garbage.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    for name in [*garbage, "foreign", "pickled"]:
        path = str(tmp_path / f"{name}.pt")
        shutil.copy(path, run / "last.pt")
        message = refused(train_module.main, [*TORCH_RUN, "--out-dir", str(run), "--resume"], capsys)
        assert message.startswith(f"error: {run / 'last.pt'} is not a readable cnn checkpoint ("), message
        message = refused(eval_module.main, ["--checkpoint", path], capsys)
        assert message.startswith(f"error: {path} is not a readable cnn checkpoint ("), message
    (run / "last.pt").write_bytes(real)
    message = refused(eval_module.main, ["--checkpoint", str(run)], capsys)
    assert message == f"error: {run} is not a readable cnn checkpoint (it is not a file)"
    assert folder_bytes(run) == before


def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(straight_torch, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_torch, run)  # trained on one thread
    with torch_threads(2):
        train_module.main([*TORCH_RUN, "--out-dir", str(run), "--resume", "--threads", "2"])
    warning = capsys.readouterr().err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in warning and "bit-identical" in warning
