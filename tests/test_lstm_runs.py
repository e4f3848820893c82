"""The LSTM chapter's run handling: Ctrl-C then --resume is bit-identical, runs are never overwritten, a diverging
run writes nothing, and every bad flag or file ends in one line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, call_main, folder_bytes, logged, sigint_on_call, torch_threads
from torch.nn import functional as F

import lstm.train
from lstm.runs import EXIT_INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[1]
# Blake's poems (38,000 characters) keep every validation pass to one short chunk: a run of 12 steps takes a second.
TINY = ["--books", "blake-poems.txt", "--hidden-size", "8", "--num-layers", "2", "--embedding-size", "8",
        "--seq-len", "20", "--batch-size", "4", "--eval-every", "5", "--steps", "12", "--dropout", "0.2"]
COUNTERS = ("step", "history")  # where an lstm checkpoint stands
TINY_ADDING = ["--task", "adding", "--lengths", "6", "--cells", "lstm", "rnn", "--adding-hidden-size", "4",
               "--adding-steps", "30", "--adding-batch-size", "8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(capsys, *argv):
    """lstm/train.py in this process."""
    return call_main(lstm.train.main, argv, capsys)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted tiny language-model run (12 steps, dropout on), trained once for the module."""
    out_dir = tmp_path_factory.mktemp("lstm-reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lstm.train.main([*TINY, "--out-dir", str(out_dir)])
    finally:
        torch.set_num_threads(threads)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("point", ["inside a step", "inside validation", "at an evaluation boundary"])
def test_sigint_then_resume_gives_bit_identical_losses_and_weights(point, reference_run, tmp_path, capsys):
    out_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        if point == "inside a step":  # after the backward pass of step 7, before its optimizer step
            calls = sigint_on_call(patch, torch.nn.utils, "clip_grad_norm_", lambda count, args: count == 7)
            stopped_at = 7
        elif point == "inside validation":  # the second validation pass, at step 10
            calls = sigint_on_call(patch, lstm.train, "evaluate_bpc", lambda count, args: count == 2)
            stopped_at = 10
        else:  # as last.pt is being written at step 5
            calls = sigint_on_call(patch, lstm.train, "save_checkpoint",
                                   lambda count, args: Path(args[0]).name == "last.pt")
            stopped_at = 5
        code, out, err = train(capsys, *TINY, "--out-dir", out_dir)
    assert calls["sent"] and code == EXIT_INTERRUPTED, err
    assert f"stopped at step {stopped_at}; resume with: python lstm/train.py --out-dir {out_dir} --resume" in out
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == stopped_at
    assert not (out_dir / "summary.json").exists()
    code, out, err = train(capsys, *TINY, "--out-dir", out_dir, "--resume")
    assert code == 0, err
    assert f"resumed from step {stopped_at}" in out
    assert_same_run(out_dir, reference_run, counters=COUNTERS)


@pytest.mark.slow
def test_sigint_from_another_process_then_resume_gives_the_same_run(tmp_path, capsys):
    """A real Ctrl-C from outside, at whatever step the run has reached once it has logged its first validation."""
    longer = [*TINY, "--steps", "40"]
    reference = tmp_path / "reference"
    assert train(capsys, *longer, "--out-dir", reference)[0] == 0
    out_dir = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "lstm/train.py"), *longer, "--out-dir", str(out_dir)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out_dir / "metrics.jsonl").is_file() and (out_dir / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err
    assert "stopped at step" in out, "the run ended before the signal arrived; make it longer"
    code, _, err = train(capsys, *longer, "--out-dir", out_dir, "--resume")  # in this process: no second start-up
    assert code == 0, err
    assert_same_run(out_dir, reference, counters=COUNTERS)


@pytest.mark.slow
def test_sigint_in_the_adding_problem_then_resume_gives_the_same_runs(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert train(capsys, *TINY_ADDING, "--out-dir", reference)[0] == 0
    out_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:  # step 12 of the second model (the RNN)
        sigint_on_call(patch, torch.nn.utils, "clip_grad_norm_", lambda count, args: count == 30 + 12)
        code, out, err = train(capsys, *TINY_ADDING, "--out-dir", out_dir)
    assert code == EXIT_INTERRUPTED and "stopped at step 12 of adding-rnn-6" in out, err
    assert train(capsys, *TINY_ADDING, "--out-dir", out_dir, "--resume")[0] == 0
    assert logged(out_dir) == logged(reference)
    for cell in ("lstm", "rnn"):
        got, want = (torch.load(folder / f"adding-{cell}-6-last.pt", weights_only=True)
                     for folder in (out_dir, reference))
        assert got["history"] == want["history"]
        assert all(torch.equal(got["model"][key], value) for key, value in want["model"].items())


def test_a_new_run_into_a_run_folder_is_refused_and_overwrite_replaces_it(reference_run, tmp_path, capsys):
    before = folder_bytes(reference_run)
    code, _, err = train(capsys, *TINY, "--out-dir", reference_run)
    assert code == 1 and err.strip() == (f"error: {reference_run} already holds a run (last.pt); pass --resume to "
                                         f"continue it, --out-dir DIR to start a new run elsewhere, or --overwrite "
                                         f"to replace it")
    code, _, err = train(capsys, *TINY, "--out-dir", reference_run, "--resume", "--overwrite")
    assert code == 1 and "pass only one" in err
    assert folder_bytes(reference_run) == before

    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    (copy / "notes.txt").write_text("mine")  # a file the chapter did not write stays
    code, _, err = train(capsys, *TINY, "--steps", "5", "--out-dir", copy, "--overwrite")
    assert code == 0, err
    assert torch.load(copy / "last.pt", weights_only=True)["step"] == 5
    assert len(logged(copy)) == 2 and (copy / "notes.txt").read_text() == "mine"

    code, _, err = train(capsys, *TINY, "--out-dir", tmp_path / "empty", "--resume")
    assert code == 1 and f"--resume: {tmp_path / 'empty' / 'last.pt'} does not exist" in err
    (tmp_path / "a-file").write_text("")
    code, _, err = train(capsys, *TINY, "--out-dir", tmp_path / "a-file")
    assert code == 1 and "is a file, not a folder" in err


def test_resume_with_a_changed_fixed_argument_is_refused(reference_run, capsys):
    before = folder_bytes(reference_run)
    code, _, err = train(capsys, *TINY, "--batch-size", "8", "--out-dir", reference_run, "--resume")
    assert code == 1
    assert err.strip() == ("error: --batch-size was 4 in the saved run and is 8 now; a resumed run keeps its "
                           "settings (start a new run with --out-dir)")
    for flag, value in (("--seed", "1"), ("--lr", "0.02"), ("--steps", "13"), ("--hidden-size", "9")):
        code, _, err = train(capsys, *TINY, flag, value, "--out-dir", reference_run, "--resume")
        assert code == 1 and f"{flag} was" in err, err
    assert folder_bytes(reference_run) == before


def nan_on(count_wanted, grad_enabled):
    """A cross-entropy that returns NaN on its count_wanted-th call made with (or without) gradients."""
    original = F.cross_entropy
    calls = {"count": 0}

    def cross_entropy(*args, **kwargs):
        loss = original(*args, **kwargs)
        if torch.is_grad_enabled() == grad_enabled:
            calls["count"] += 1
            if calls["count"] == count_wanted:
                return loss * float("nan")
        return loss

    return cross_entropy


@pytest.mark.parametrize("which, count, message", [
    ("training", 8, "the training loss is not finite at step 8; stopped without saving: last.pt (step 5) holds the "
                    "last good state"),
    ("training", 2, "the training loss is not finite at step 2; stopped without saving: no checkpoint was written "
                    "yet"),
    ("validation", 2, "the validation loss is not finite at step 10; stopped without saving: last.pt (step 5) holds "
                      "the last good state"),
])
def test_a_non_finite_loss_stops_before_any_write(which, count, message, reference_run, tmp_path, capsys):
    out_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        # A validation pass over Blake's text is one call of cross_entropy.
        patch.setattr(F, "cross_entropy", nan_on(count, grad_enabled=which == "training"))
        code, _, err = train(capsys, *TINY, "--out-dir", out_dir)
    assert code == 1 and err.strip().splitlines()[-1] == f"error: {message}"  # after the progress bar's lines
    if count == 2 and which == "training":
        assert not list(out_dir.glob("*.pt"))
        return
    last = torch.load(out_dir / "last.pt", weights_only=True)
    first_record = logged(reference_run)[:1]
    assert last["step"] == 5 and logged(out_dir) == first_record
    assert not list(out_dir.glob("*.tmp"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files that are not checkpoints: empty, truncated, text, a PNG header, a pickle of a non-tensor class."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("not a checkpoint\n")
    (folder / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    torch.save({"model": {}, "config": {}, "step": 0}, folder / "whole.pt")
    (folder / "truncated.pt").write_bytes((folder / "whole.pt").read_bytes()[:100])
    torch.save({"model": {}, "config": {}, "step": 0, "object": torch.nn.Linear(1, 1)}, folder / "pickled.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    return sorted(path for path in folder.iterdir() if path.name != "whole.pt")


def test_every_bad_checkpoint_file_gets_one_line(bad_files, reference_run, tmp_path, capsys):
    import lstm.compare
    import lstm.eval
    import lstm.gradient_flow

    for bad in bad_files:
        code, _, err = call_main(lstm.eval.main, ["--checkpoint", bad], capsys)
        assert code == 1 and err.startswith(f"error: {bad} is not a readable lstm checkpoint ("), err
        assert len(err.strip().splitlines()) == 1 and "weights_only" not in err
        run_dir = tmp_path / bad.stem
        run_dir.mkdir()
        shutil.copy(bad, run_dir / "last.pt")
        for name in ("adding-lstm-100-best.pt", "adding-rnn-100-best.pt"):
            shutil.copy(bad, run_dir / name)
        before = folder_bytes(run_dir)
        code, _, err = train(capsys, *TINY, "--out-dir", run_dir, "--resume")
        assert code == 1 and "is not a readable lstm checkpoint" in err and "weights_only" not in err, err
        code, _, err = call_main(lstm.gradient_flow.main, ["--run-dir", run_dir], capsys)
        assert code == 1 and "is not a readable lstm checkpoint" in err, err
        assert folder_bytes(run_dir) == before

    compare_run = tmp_path / "compare"
    shutil.copytree(reference_run, compare_run)
    shutil.copy(bad_files[0], compare_run / "best.pt")
    before = folder_bytes(compare_run)
    code, _, err = call_main(lstm.compare.main, [compare_run, "--context-out", tmp_path / "context.png"], capsys)
    assert code == 1 and "is not a readable lstm checkpoint" in err, err
    for flag, path in (("--out", compare_run / "metrics.jsonl" / "curves.png"), ("--context-out", compare_run),
                       ("--out", tmp_path / "curves.jpg")):  # refused before the best.pt above is read
        code, out, err = call_main(lstm.compare.main, [compare_run, flag, path, "--context-out" if
                                                       flag == "--out" else "--out", tmp_path / "other.png"], capsys)
        assert code == 1 and out == "" and err.startswith(f"error: {flag} ") and len(err.splitlines()) == 1, err
    (compare_run / "metrics.jsonl").write_text("garbage\n")
    before = folder_bytes(compare_run)
    code, _, err = call_main(lstm.compare.main, [compare_run], capsys)
    assert code == 1 and "is not a language-model log" in err, err
    assert folder_bytes(compare_run) == before


BAD_NUMBERS = {
    "lstm.train": ["--hidden-size", "--num-layers", "--embedding-size", "--dropout", "--seq-len", "--batch-size",
                   "--steps", "--lr", "--grad-clip", "--eval-every", "--lengths", "--adding-steps",
                   "--adding-hidden-size", "--adding-batch-size", "--adding-lr", "--adding-forget-bias", "--seed"],
    "lstm.eval": ["--temperature", "--length", "--seed"],
    "lstm.compare": ["--window"],
    "lstm.bench": ["--repeats", "--runs"],
    "lstm.gradient_flow": ["--length", "--batch-size", "--seed"],
}
ALLOWED = {("--adding-forget-bias", "0"), ("--adding-forget-bias", "-1"), ("--seed", "0"), ("--dropout", "0")}


def test_every_numeric_flag_of_every_cli_refuses_out_of_range_values(reference_run, capsys):
    import importlib

    before = folder_bytes(reference_run)
    for module_name, flags in BAD_NUMBERS.items():
        module = importlib.import_module(module_name)
        positional = [str(reference_run)] if module_name == "lstm.compare" else []
        for flag in flags:
            for value in ("0", "-1", "nan", "inf", "1e400", "x"):
                if (flag, value) in ALLOWED:
                    continue
                argv = [*positional, flag, value]
                if module_name == "lstm.train":
                    argv += ["--out-dir", reference_run]
                code, _, err = call_main(module.main, argv, capsys)
                assert code == 2 and f"argument {flag}" in err and "Traceback" not in err, (module_name, argv, err)
    assert folder_bytes(reference_run) == before


@pytest.mark.parametrize("script, argv, fragment", [
    ("lstm.train", ["--hidden-size", "100000", "--num-layers", "1000"], "parameters, more than this script builds"),
    ("lstm.train", ["--batch-size", "1000000000"], "too short for --batch-size"),
    ("lstm.train", ["--seq-len", "1000000000"], "too short for --batch-size"),
    ("lstm.train", ["--task", "adding", "--lengths", "1000000000"], "more than this script builds"),
    ("lstm.train", ["--device", "foo"], "unknown device 'foo'"),
    ("lstm.gradient_flow", ["--batch-size", "1000000000"], "more than this script builds"),
    ("lstm.bench", ["--sizes", "100000x100000x100000x1"], "too large to time here"),
    ("lstm.bench", ["--device", "foo"], "unknown device 'foo'"),
])
def test_huge_or_unknown_values_get_one_line_before_any_work(script, argv, fragment, tmp_path, capsys):
    import importlib

    out_dir = tmp_path / "run"
    if script == "lstm.train":
        argv = [*argv, "--books", "blake-poems.txt", "--out-dir", str(out_dir)]
    if script == "lstm.gradient_flow":
        argv = [*argv, "--run-dir", str(out_dir)]
    code, _, err = call_main(importlib.import_module(script).main, argv, capsys)
    assert code == 1 and err.startswith("error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists() or not list(out_dir.iterdir())


@pytest.mark.slow
def test_a_bad_checkpoint_ends_without_a_traceback_in_a_real_process(tmp_path):
    """The in-process tests above see SystemExit; this one sees what a user sees: stderr and the exit code."""
    (tmp_path / "last.pt").write_bytes(b"")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "lstm/train.py"), "--out-dir", str(tmp_path), "--resume",
                             "--grad-clip", "0.5"], cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'last.pt'} is not a readable lstm "
                                                      f"checkpoint (the file is empty)")
    assert (tmp_path / "last.pt").read_bytes() == b"" and [path.name for path in tmp_path.iterdir()] == ["last.pt"]


def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(reference_run, tmp_path, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(reference_run, out_dir)  # trained on one thread
    with torch_threads(2):
        code, _, err = train(capsys, *TINY, "--out-dir", out_dir, "--resume", "--threads", "2")
    assert code == 0, err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in err and "bit-identical" in err
