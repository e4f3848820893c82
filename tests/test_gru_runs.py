"""The GRU chapter's run handling: Ctrl-C then --resume is bit-identical, runs are never overwritten unasked,
a changed setting or a non-finite loss stops with one line, and every bad flag or file is refused harmlessly."""

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, call_main, folder_bytes, logged, torch_threads

import gru.bench as bench_script
import gru.eval as eval_script
import gru.train as train_script
from gru.model import Tagger
from gru.runs import EXIT_INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[1]
# 64 sentences in batches of 16: 4 steps per epoch, 2 epochs, dropout on
TINY = ["--limit-train", "64", "--validation-size", "32", "--embedding-dim", "16", "--hidden-size", "16",
        "--batch-size", "16", "--epochs", "2", "--device", "cpu"]

# Runs inside one subprocess (OMP_NUM_THREADS=1): an uninterrupted run, then each interrupted run followed by its
# --resume. The SIGINT is a real signal sent to the process itself at a chosen point: inside the forward pass of a
# given step, inside validation, or while the end of an epoch is being written.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import gru.train as train
    from gru.model import Tagger

    base, tiny = sys.argv[1], sys.argv[2:]
    original_loss, original_mean_loss = Tagger.loss, train.mean_loss
    plan = {"where": None, "step": 0, "steps": 0}

    def interrupt(where):
        if plan["where"] == where and (where != "step" or plan["steps"] == plan["step"]):
            os.kill(os.getpid(), signal.SIGINT)

    def loss(self, *arguments):  # counts training steps only (validation runs in eval mode)
        if self.training:
            plan["steps"] += 1
            interrupt("step")
        return original_loss(self, *arguments)

    def mean_loss(*arguments, **options):
        interrupt("validation")
        return original_mean_loss(*arguments, **options)

    def plot_curves(*arguments):  # drawing is tested elsewhere; here it would only take time
        interrupt("boundary")

    Tagger.loss, train.mean_loss, train.plot_curves = loss, mean_loss, plot_curves

    def run(name, *calls):
        \"\"\"One call of train.main per (where, step); the first starts the run, the others resume it.\"\"\"
        out_dir, codes = os.path.join(base, name), []
        for index, (where, step) in enumerate(calls):
            plan.update(where=where, step=step, steps=0)
            codes.append(train.main([*tiny, "--out-dir", out_dir, *(["--resume"] if index else [])]))
        print(name, *codes, flush=True)

    run("straight", (None, 0))
    run("inside-step", ("step", 2), (None, 0))
    run("inside-validation", ("validation", 0), (None, 0))
    run("epoch-boundary", ("boundary", 0), (None, 0))
    run("twice", ("step", 3), ("step", 3), (None, 0))  # stopped at step 3, resumed, stopped at step 6, resumed
""")



@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """The driver's run folders and its printout."""
    base = tmp_path_factory.mktemp("gru-interrupted")
    result = subprocess.run([sys.executable, "-c", DRIVER, str(base), *TINY], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name,stops_at", [("inside-step", [2]), ("inside-validation", [4]), ("epoch-boundary", [4]),
                                           ("twice", [3, 6])])
def test_sigint_then_resume_is_bit_identical_to_an_uninterrupted_run(interrupted_runs, name, stops_at):
    base, printout = interrupted_runs
    straight, run_dir = base / "straight", base / name
    codes = [str(EXIT_INTERRUPTED)] * len(stops_at) + ["0"]  # each stopped call exits with 130, the last with 0
    assert f"{name} " + " ".join(codes) in printout
    for step in stops_at:
        assert f"stopped at step {step}; resume with: python gru/train.py --out-dir {run_dir} --resume" in printout
    assert len(logged(straight)) == 2
    assert_same_run(run_dir, straight, counters=("step", "epoch"))
    for file_name in ("last.pt", "best.pt"):
        expected = torch.load(straight / file_name, weights_only=True)
        found = torch.load(run_dir / file_name, weights_only=True)
        assert torch.equal(found["rng_states"]["cpu"], expected["rng_states"]["cpu"])


@pytest.mark.slow
def test_a_mid_epoch_stop_saves_the_position_inside_the_epoch(tmp_path):
    run_dir = tmp_path / "run"
    code = run_with_sigint_at_step(run_dir, 3)
    assert code == EXIT_INTERRUPTED
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (0, 3, 3)
    assert saved["rng_states"]["cpu"].device.type == "cpu" and saved["batch_rng"].device.type == "cpu"
    assert not (run_dir / "best.pt").exists() and not (run_dir / "metrics.jsonl").exists()


def run_with_sigint_at_step(run_dir: Path, step: int, extra=()) -> int:
    """A tiny run in this process that receives a real SIGINT inside the forward pass of `step`."""
    calls = {"steps": 0}
    original = Tagger.loss

    def loss(self, *arguments):
        if self.training:
            calls["steps"] += 1
            if calls["steps"] == step:
                os.kill(os.getpid(), 2)  # SIGINT
        return original(self, *arguments)

    Tagger.loss = loss
    try:
        return train_script.main([*TINY, "--out-dir", str(run_dir), *extra])
    finally:
        Tagger.loss = original


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """The training curves are drawn in tests/test_gru.py; here drawing them would only take time."""
    monkeypatch.setattr(train_script, "plot_curves", lambda history, path: None)


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """A run folder holding the first of two epochs (last.pt, best.pt, metrics.jsonl)."""
    run_dir = tmp_path_factory.mktemp("gru-first-epoch") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_script, "plot_curves", lambda history, path: None)
        assert train_script.main([*TINY, "--out-dir", str(run_dir), "--stop-after", "1"]) == 0
    return run_dir


@pytest.fixture
def finished_epoch(first_epoch, tmp_path):
    """A fresh copy of that run folder for one test to use."""
    return Path(shutil.copytree(first_epoch, tmp_path / "run"))


def last_line(err: str) -> str:
    """The last line of stderr, without what a progress bar left before it on the same line."""
    return err.rstrip().splitlines()[-1].split("\r")[-1]


def test_a_run_folder_is_refused_in_one_line_and_replaced_only_with_overwrite(finished_epoch, capsys):
    before = folder_bytes(finished_epoch)
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch], capsys)
    assert code == 1 and err == (f"error: {finished_epoch} already holds a run (last.pt); pass --resume to continue "
                                 "it, --out-dir DIR to start a new run elsewhere, or --overwrite to replace it\n")
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch, "--resume", "--overwrite"], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert folder_bytes(finished_epoch) == before
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch, "--overwrite", "--stop-after",
                                                 "1", "--seed", "1"], capsys)
    assert code == 0, err
    replaced = torch.load(finished_epoch / "last.pt", weights_only=True)
    assert replaced["args"]["seed"] == 1 and [row["epoch"] for row in replaced["history"]] == [1]


def test_resume_needs_a_last_checkpoint_and_an_out_dir_that_is_a_folder(tmp_path, capsys):
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", tmp_path / "empty", "--resume"], capsys)
    assert code == 1 and err == f"error: --resume: {tmp_path / 'empty' / 'last.pt'} does not exist\n"
    (tmp_path / "file").write_text("x")
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", tmp_path / "file"], capsys)
    assert code == 1 and err == f"error: --out-dir {tmp_path / 'file'} is a file, not a folder\n"


@pytest.mark.parametrize("flag,value,saved", [("--seed", "1", "0"), ("--validation-size", "40", "32"),
                                              ("--batch-size", "8", "16"), ("--lr", "0.01", "0.003"),
                                              ("--hidden-size", "32", "16"), ("--epochs", "3", "2"),
                                              ("--backward", "autograd", "handwritten")])
def test_resume_refuses_a_changed_setting_in_one_line(finished_epoch, capsys, flag, value, saved):
    before = folder_bytes(finished_epoch)
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch, "--resume", flag, value], capsys)
    assert code == 1
    assert err == (f"error: {flag} was {saved} in the saved run and is {value} now; a resumed run keeps its settings "
                   "(start a new run with --out-dir)\n")
    assert folder_bytes(finished_epoch) == before


@pytest.mark.parametrize("where", ["training", "validation"])
def test_a_non_finite_loss_stops_the_run_before_any_write(finished_epoch, capsys, monkeypatch, where):
    before = folder_bytes(finished_epoch)
    original_loss, calls = Tagger.loss, {"steps": 0}

    def loss(self, *arguments):
        value = original_loss(self, *arguments)
        if self.training:
            calls["steps"] += 1
            if calls["steps"] == 2:  # the second step of the resumed epoch, step 6 of the run
                return value * math.nan
        return value

    if where == "training":
        monkeypatch.setattr(Tagger, "loss", loss)
        expected = "the training loss is not finite at step 6"
    else:
        monkeypatch.setattr(train_script, "mean_loss", lambda *arguments, **options: math.inf)
        expected = "the validation loss is not finite at step 8"
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch, "--resume", "--threads", "2"],
                                    capsys)
    assert code == 1
    assert last_line(err) == f"error: {expected}; stopped without saving: last.pt (step 4) holds the last good state"
    assert folder_bytes(finished_epoch) == before


def test_a_non_finite_first_loss_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Tagger, "loss", lambda self, *arguments: torch.tensor(math.nan))
    code, _, err = call_main(train_script.main, [*TINY, "--out-dir", tmp_path / "run"], capsys)
    assert code == 1
    assert last_line(err) == ("error: the training loss is not finite at step 1; stopped without saving: no "
                              "checkpoint was written yet")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


BAD_VALUES = {
    train_script: {"--epochs": ["0", "-1", "nan", "1.5"], "--batch-size": ["0", "-1"],
                   "--lr": ["0", "-1", "nan", "inf"], "--clip": ["-1", "nan", "inf"], "--grad-clip": ["-5"],
                   "--embedding-dim": ["0", "-1", "100000"], "--hidden-size": ["0", "-1", "100000"],
                   "--num-layers": ["0", "-1", "100"], "--dropout": ["-0.1", "1", "nan"], "--min-count": ["0", "-1"],
                   "--validation-size": ["0", "-1"], "--max-length": ["0", "-1"], "--limit-train": ["-1", "nan"],
                   "--seed": ["-1", str(2**64), "x"], "--stop-after": ["-1"]},
    eval_script: {"--max-length": ["0", "-1", "nan"], "--limit": ["-1", "1e3"]},
    bench_script: {"--repeats": ["0", "-1", "nan"], "--tag-sentences": ["0", "-1"]},
}


@pytest.mark.parametrize("script", list(BAD_VALUES), ids=lambda script: script.__name__)
def test_every_numeric_flag_refuses_out_of_range_values(finished_epoch, capsys, script):
    before = folder_bytes(finished_epoch)
    base = {train_script: [*TINY, "--out-dir", finished_epoch, "--resume"],
            eval_script: ["--checkpoint", finished_epoch / "best.pt", "--tag", "北京"], bench_script: []}[script]
    for flag, values in BAD_VALUES[script].items():
        for value in values:
            code, out, err = call_main(script.main, [*base, flag, value], capsys)
            assert code == 2 and "error: argument" in err.splitlines()[-1], (flag, value, err)
            assert out == ""
    assert folder_bytes(finished_epoch) == before


GARBAGE = {"empty": b"", "text": b"these are not weights\n", "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
           "pickle of a function": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system"
                                   b"\x94\x93\x94."}


@pytest.mark.parametrize("kind", [*GARBAGE, "truncated", "foreign dict"])
def test_a_garbage_checkpoint_is_one_line_for_train_and_eval(finished_epoch, capsys, kind):
    real = (finished_epoch / "last.pt").read_bytes()
    content = {"truncated": real[: len(real) // 2]}.get(kind, GARBAGE.get(kind))
    if kind == "foreign dict":
        torch.save({"weights": torch.zeros(2)}, finished_epoch / "last.pt")
    else:
        (finished_epoch / "last.pt").write_bytes(content)
    before = folder_bytes(finished_epoch)
    for script, arguments in ((train_script, [*TINY, "--out-dir", finished_epoch, "--resume"]),
                              (eval_script, ["--checkpoint", finished_epoch / "last.pt", "--tag", "北京"])):
        code, _, err = call_main(script.main, arguments, capsys)
        assert code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {finished_epoch / 'last.pt'} is not a readable gru checkpoint (")
        assert "weights_only" not in err
    assert folder_bytes(finished_epoch) == before


@pytest.mark.slow
def test_the_clis_end_bad_input_with_one_line_and_no_traceback(finished_epoch, run_cli):
    (finished_epoch / "last.pt").write_bytes(GARBAGE["png"])
    before = folder_bytes(finished_epoch)
    env = {"OMP_NUM_THREADS": "1"}
    # one real command line (the in-process tests above cover every script's main() the same way)
    for script, arguments in (("gru/train.py", [*TINY, "--out-dir", str(finished_epoch), "--resume"]),):
        result = run_cli(script, *arguments, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (script, result.stderr)
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, (script, result.stderr)
    assert folder_bytes(finished_epoch) == before


def test_an_unknown_device_is_one_line_for_every_cli(finished_epoch, capsys):
    before = folder_bytes(finished_epoch)
    for script, arguments in ((train_script, [*TINY, "--out-dir", finished_epoch, "--resume"]),
                              (eval_script, ["--checkpoint", finished_epoch / "best.pt", "--tag", "北京"]),
                              (bench_script, [])):
        code, _, err = call_main(script.main, [*arguments, "--device", "foo"], capsys)
        assert code == 1 and err == "error: unknown device 'foo' (use auto, cpu, cuda or mps)\n"
    assert folder_bytes(finished_epoch) == before


def test_eval_draws_its_picture_into_the_run_folder_unless_told_otherwise(finished_epoch, capsys, tmp_path):
    code, out, err = call_main(eval_script.main, ["--checkpoint", finished_epoch / "best.pt", "--limit", "20"], capsys)
    assert code == 0, err
    picture = finished_epoch / "confusion-first-20.png"  # a part of the test set: its own name
    assert picture.stat().st_size > 0 and f"{picture}" in out
    elsewhere = tmp_path / "confusion-elsewhere.png"
    code, _, err = call_main(eval_script.main, ["--checkpoint", finished_epoch / "best.pt", "--limit", "20",
                                                "--confusion-png", elsewhere], capsys)
    assert code == 0 and elsewhere.stat().st_size > 0


@pytest.mark.slow
def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(finished_epoch, capsys):
    with torch_threads(2):  # the first epoch was trained on one thread
        code, _, err = call_main(train_script.main, [*TINY, "--out-dir", finished_epoch, "--resume", "--threads", "2"],
                                    capsys)
    assert code == 0, err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in err and "bit-identical" in err
