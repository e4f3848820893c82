"""The rnn chapter's run handling: Ctrl-C resumes bit-identically, runs are never overwritten unasked, a diverging
run writes nothing, and every bad flag or file ends in one line without touching the run folder."""

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, folder_bytes, logged, sigint_on_call, torch_threads

from rnn import bench, hello, vanishing
from rnn import eval as rnn_eval
from rnn import train as rnn_train
from rnn.runs import EXIT_INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[1]
# 200 training names in batches of 32: 7 steps per epoch, dropout 0.3 on, 4 epochs.
TINY = ["--epochs", "4", "--limit", "200", "--batch-size", "32", "--hidden-size", "16", "--embedding-size", "8",
        "--device", "cpu", "--no-progress"]
STEPS_PER_EPOCH = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def train_in_process(out_dir, *extra):
    """rnn/train.py's main in this process; the exit status: 0, argparse's 2, or the one-line error message."""
    try:
        rnn_train.main([*TINY, "--out-dir", str(out_dir), *extra])
    except SystemExit as exit_status:
        return exit_status.code
    return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run."""
    out_dir = tmp_path_factory.mktemp("rnn-reference")
    assert train_in_process(out_dir) == 0
    assert len(logged(out_dir)) == 4
    return out_dir


def copy_of(run_dir, tmp_path):
    destination = tmp_path / "run"
    shutil.copytree(run_dir, destination)
    return destination


# Where the SIGINT lands: inside a step (between backward and the optimizer step), inside the last step of an
# epoch (its validation is still to run), inside validation, and at an evaluation boundary (after the records).
INTERRUPTIONS = {
    "inside a step": ("clip_gradient_norm", STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH + 3),
    "last step of an epoch": ("clip_gradient_norm", 2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH),
    "inside validation": ("predict_probabilities", 1, STEPS_PER_EPOCH),
    "at an evaluation boundary": ("write_metrics", 2, 2 * STEPS_PER_EPOCH),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", INTERRUPTIONS)
def test_sigint_then_resume_is_bit_identical_to_an_uninterrupted_run(reference, tmp_path, monkeypatch, capsys,
                                                                     where):
    function, call, stopped_step = INTERRUPTIONS[where]
    out_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        sigint_on_call(patch, rnn_train, function, call)
        assert train_in_process(out_dir) == EXIT_INTERRUPTED
    output = capsys.readouterr().out
    assert f"stopped at step {stopped_step}; resume with: python rnn/train.py --out-dir {out_dir} --resume" in output
    assert "test accuracy" not in output and not (out_dir / "interrupted.pt").exists()
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == stopped_step
    assert train_in_process(out_dir, "--resume") == 0
    assert "test accuracy" in capsys.readouterr().out
    assert_same_run(out_dir, reference)


@pytest.mark.slow
def test_sigint_to_the_cli_at_a_random_point_then_resume_is_bit_identical(reference, tmp_path):
    out_dir = tmp_path / "run"
    command = [sys.executable, str(REPO_ROOT / "rnn/train.py"), *TINY, "--out-dir", str(out_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    for line in process.stdout:  # wait for the first epoch's record, then interrupt somewhere in the second
        if line.startswith("epoch   1"):
            process.send_signal(signal.SIGINT)
            break
    output, errors = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED, errors
    assert "Traceback" not in errors
    printed = output.strip().splitlines()[-1]  # the command it prints, run as printed (on the CPU)
    assert printed.startswith("stopped at step ")
    assert printed.endswith(f"resume with: python rnn/train.py --out-dir {out_dir} --resume")
    resume = [sys.executable, *printed.split("resume with: python ")[1].split(), "--device", "cpu"]
    resumed = subprocess.run(resume, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out_dir, reference)


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once_without_saving(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    original, handler_before = rnn_train.clip_gradient_norm, signal.getsignal(signal.SIGINT)

    def interrupt_twice(*arguments, **keywords):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return original(*arguments, **keywords)

    monkeypatch.setattr(rnn_train, "clip_gradient_norm", interrupt_twice)
    status = train_in_process(out_dir)
    assert isinstance(status, str) and status.startswith("error: interrupted")
    assert not (out_dir / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(reference, tmp_path):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    status = train_in_process(out_dir)
    assert status == (f"error: {out_dir} already holds a run (last.pt); pass --resume to continue it, --out-dir DIR "
                      "to start a new run elsewhere, or --overwrite to replace it")
    assert folder_bytes(out_dir) == before
    (out_dir / "last.pt").unlink()
    assert "already holds a run (best.pt)" in train_in_process(out_dir)
    (out_dir / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.0}\n' * 9)
    (out_dir / "confusion.png").write_bytes(b"an older run's picture")
    assert train_in_process(out_dir, "--overwrite") == 0
    assert_same_run(out_dir, reference)
    assert not (out_dir / "confusion.png").exists()


def test_run_folder_errors_are_one_line(reference, tmp_path):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    assert "pass only one" in train_in_process(out_dir, "--resume", "--overwrite")
    missing = tmp_path / "empty" / "last.pt"
    assert train_in_process(tmp_path / "empty", "--resume") == f"error: --resume: {missing} does not exist"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    assert "is a file" in train_in_process(a_file)
    assert "is a file" in train_in_process(a_file / "below")
    assert folder_bytes(out_dir) == before and a_file.read_text() == "not a folder\n"


@pytest.mark.parametrize("flag, value", [("--batch-size", "16"), ("--seed", "1"), ("--learning-rate", "0.01"),
                                         ("--no-bidirectional", None)])
def test_resume_refuses_a_changed_setting(reference, tmp_path, flag, value):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    status = train_in_process(out_dir, "--resume", flag, *([value] if value else []))
    if flag == "--batch-size":
        assert status == ("error: --batch-size was 32 in the saved run and is 16 now; a resumed run keeps its "
                          "settings (start a new run with --out-dir)")
    else:
        assert status.startswith(f"error: --{flag.removeprefix('--').removeprefix('no-')} was ")
        assert "keeps its settings" in status
    assert folder_bytes(out_dir) == before


def test_a_non_finite_training_loss_stops_before_any_write(reference, tmp_path, monkeypatch):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    original, calls = torch.nn.functional.cross_entropy, [0]

    def diverging(*arguments, **keywords):
        calls[0] += 1
        loss = original(*arguments, **keywords)
        return loss * math.nan if calls[0] == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    status = train_in_process(out_dir, "--resume", "--epochs", "6")  # --epochs may grow: train longer
    assert status == ("error: the training loss is not finite at step 31; stopped without saving: last.pt (step 28) "
                      "holds the last good state")
    assert folder_bytes(out_dir) == before


def test_a_non_finite_validation_loss_stops_before_any_write(reference, tmp_path, monkeypatch):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    monkeypatch.setattr(rnn_train, "predict_probabilities", lambda *arguments: torch.full((1802, 18), math.nan))
    status = train_in_process(out_dir, "--resume", "--epochs", "5")
    assert status == ("error: the validation loss is not finite at step 35; stopped without saving: last.pt "
                      "(step 28) holds the last good state")
    assert folder_bytes(out_dir) == before


def test_a_run_that_diverges_at_once_writes_nothing(tmp_path):
    status = train_in_process(tmp_path / "run", "--learning-rate", "1e30")
    assert "loss is not finite" in status and "no checkpoint was written yet" in status
    assert not (tmp_path / "run").exists()


# Every numeric flag of every rnn CLI, with values out of its range.
BAD_FLAGS = {
    rnn_train.parse_arguments: {
        "--epochs": ["0", "-1", "nan", "1.5"], "--batch-size": ["0", "-1", "nan"], "--hidden-size": ["0", "-1"],
        "--embedding-size": ["0", "nan"], "--num-layers": ["0", "-1"], "--dropout": ["1", "-0.1", "nan", "inf"],
        "--learning-rate": ["0", "-1", "nan", "inf"], "--weight-decay": ["-1", "nan", "inf"],
        "--label-smoothing": ["1", "-1", "nan"], "--clip": ["-1", "nan", "inf"], "--seed": ["-1", "nan", str(2**64)],
        "--split-seed": ["-1", "1e3"], "--limit": ["-1", "nan"],
    },
    bench.main: {"--repeats": ["0", "-1", "nan", "1e9"]},
    hello.main: {"--hidden-size": ["0", "-1", "nan", str(10**9)], "--steps": ["0", "-1", "nan", str(10**12)],
                 "--seed": ["-1", "nan"]},
    vanishing.main: {"--steps": ["0", "-1", "10", "nan", str(10**9)], "--batch-size": ["0", "-1", "nan", str(10**9)]},
}


def test_every_numeric_flag_of_every_cli_refuses_values_out_of_its_range(tmp_path, capsys):
    where = {rnn_train.parse_arguments: ["--out-dir", str(tmp_path / "run")],
             vanishing.main: ["--out", str(tmp_path / "run" / "vanishing.png")]}
    for entry, flags in BAD_FLAGS.items():
        for flag, values in flags.items():
            for value in values:
                with pytest.raises(SystemExit) as exit_status:
                    entry([flag, value, *where.get(entry, [])])
                assert exit_status.value.code == 2, (entry.__module__, flag, value)
                errors = capsys.readouterr().err
                assert flag in errors and "Traceback" not in errors, (entry.__module__, flag, value)
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_memory_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_status:
        rnn_train.parse_arguments(["--hidden-size", str(10**9)])
    assert exit_status.value.code == 2 and "parameters" in capsys.readouterr().err


def garbage_files(folder):
    """Files that are not rnn checkpoints: empty, text, a PNG, a truncated checkpoint, another chapter's, a pickle."""
    folder.mkdir()
    files = {"empty.pt": b"", "text.pt": b"just some text\n", "picture.pt": b"\x89PNG\r\n\x1a\n" + bytes(range(256))}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    torch.save({"chapter": "rnn", "model": {"w": torch.zeros(3)}}, folder / "full.pt")
    (folder / "truncated.pt").write_bytes((folder / "full.pt").read_bytes()[:100])
    torch.save({"chapter": "cnn", "model": {}}, folder / "other-chapter.pt")
    (folder / "pickle.pt").write_bytes(b"\x80\x04\x95\x14\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system"
                                       b"\x94\x93\x94.")
    return sorted(folder.iterdir())



def test_eval_refuses_an_out_dir_it_cannot_create_before_scoring(reference, tmp_path, monkeypatch):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)

    def no_work(*arguments, **options):
        raise AssertionError("the test split was scored before --out-dir was checked")

    monkeypatch.setattr(rnn_eval, "predict_probabilities", no_work)
    below_a_file = out_dir / "metrics.jsonl" / "figures"
    with pytest.raises(SystemExit) as exit_status:
        rnn_eval.main(["--checkpoint", str(out_dir / "best.pt"), "--out-dir", str(below_a_file)])
    assert exit_status.value.code == f"error: cannot create --out-dir {below_a_file} (Not a directory)"
    assert folder_bytes(out_dir) == before

def test_eval_and_resume_refuse_files_that_are_not_rnn_checkpoints_in_one_line(reference, tmp_path):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    for path in garbage_files(tmp_path / "garbage"):
        with pytest.raises(SystemExit) as exit_status:
            rnn_eval.main(["--checkpoint", str(path), "--out-dir", str(out_dir)])
        message = exit_status.value.code
        assert message.startswith(f"error: {path} is not a readable rnn checkpoint ("), message
        assert "weights_only" not in message and "\n" not in message
        run_dir = tmp_path / f"resume-{path.stem}"
        run_dir.mkdir()
        shutil.copy(path, run_dir / "last.pt")
        message = train_in_process(run_dir, "--resume")
        assert message.startswith(f"error: {run_dir / 'last.pt'} is not a readable rnn checkpoint ("), message
        assert "weights_only" not in message and "\n" not in message
        assert (run_dir / "last.pt").read_bytes() == path.read_bytes() and len(list(run_dir.iterdir())) == 1
    assert folder_bytes(out_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("script, arguments, expected", [
    ("rnn/eval.py", ["--checkpoint", "{garbage}", "--out-dir", "{run}"], "is not a readable rnn checkpoint"),
    ("rnn/train.py", ["--resume", "--out-dir", "{empty_run}"], "is not a readable rnn checkpoint (the file is empty)"),
    ("rnn/bench.py", ["--device", "foo"], "unknown device 'foo'"),
])
def test_the_clis_end_bad_input_in_one_line_without_a_traceback(reference, tmp_path, run_cli, script, arguments,
                                                                expected):
    out_dir = copy_of(reference, tmp_path)
    before = folder_bytes(out_dir)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (empty_run / "last.pt").write_bytes(b"")
    result = run_cli(script, *[a.format(garbage=garbage, run=out_dir, empty_run=empty_run) for a in arguments],
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert folder_bytes(out_dir) == before and folder_bytes(empty_run) == {"last.pt": b""}


def test_vanishing_writes_into_the_run_folder_or_where_out_says_never_over_the_chapter_pictures(tmp_path, capsys):
    assets = REPO_ROOT / "rnn" / "assets" / "vanishing.png"
    before = assets.read_bytes()
    vanishing.main(["--steps", "12", "--batch-size", "2", "--out-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "vanishing.png").read_bytes().startswith(b"\x89PNG")
    vanishing.main(["--steps", "12", "--batch-size", "2", "--out", str(tmp_path / "elsewhere" / "figure.png")])
    assert (tmp_path / "elsewhere" / "figure.png").read_bytes().startswith(b"\x89PNG")
    assert assets.read_bytes() == before
    with pytest.raises(SystemExit) as exit_status:
        vanishing.main(["--out", str(tmp_path / "run")])
    assert exit_status.value.code != 0 and "Traceback" not in capsys.readouterr().err


def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(reference, tmp_path, capsys):
    out_dir = copy_of(reference, tmp_path)  # trained on one thread
    with torch_threads(2):
        assert train_in_process(out_dir, "--resume", "--threads", "2") == 0
    warning = capsys.readouterr().err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in warning and "bit-identical" in warning
