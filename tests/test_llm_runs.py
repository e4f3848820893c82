"""Run handling of the llm chapter: Ctrl-C then --resume is exact (dropout on), a run is never overwritten, a
changed setting is refused on resume, a diverging loss writes nothing, every bad flag or file of every CLI ends in
one line with the run folder untouched, a damaged token file is made again, and DDP validates like one process."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, folder_bytes, logged, made_up_text_file, torch_threads

import llm.train as train_module
from llm.model import Llama
from llm.prepare import prepare
from llm.runs import EXIT_INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# 12 steps of 2 micro-batches, dropout on, validation every 4 steps on 2 global batches
TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--context-length", "16",
        "--batch-size", "4", "--grad-accum", "2", "--vocab-size", "320", "--lr", "3e-3", "--warmup-steps", "2",
        "--dropout", "0.1", "--max-steps", "12", "--eval-every", "4", "--eval-batches", "2", "--dtype", "float32",
        "--num-samples", "0", "--no-final-eval"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A small made-up text (seeded) and a data folder whose tokenizer and token files every test reuses."""
    folder = tmp_path_factory.mktemp("llm_runs")
    text_file = made_up_text_file(folder / "corpus.txt")
    data_dir = folder / "data"
    prepare("text", 320, data_dir, str(text_file), log=lambda *a: None)
    return {"root": folder, "data": ["--text-file", str(text_file), "--data-dir", str(data_dir)],
            "text_file": text_file, "data_dir": data_dir}


def train(corpus, out_dir: Path, *arguments: str):
    """llm/train.py's main in this process (no interpreter start-up) on the tiny configuration."""
    train_module.main([*TINY, *corpus["data"], "--out-dir", str(out_dir), *arguments])


@pytest.fixture(scope="module")
def straight(corpus) -> Path:
    out_dir = corpus["root"] / "straight"
    train(corpus, out_dir)
    return out_dir


def interrupt_self():
    os.kill(os.getpid(), signal.SIGINT)


def sigint_inside_a_step(monkeypatch):
    """Between the two micro-batches of step 6."""
    calls = {"training": 0}
    original = Llama.forward

    def forward(self, *arguments, **keywords):
        if self.training:
            calls["training"] += 1
            if calls["training"] == 12:
                interrupt_self()
        return original(self, *arguments, **keywords)

    monkeypatch.setattr(Llama, "forward", forward)


def sigint_inside_the_optimizer_step(monkeypatch):
    """Inside AdamW's update of step 5, after the backward passes and the clipping."""
    calls = {"count": 0}
    original = torch.optim.AdamW.step

    def step(self, *arguments, **keywords):
        calls["count"] += 1
        if calls["count"] == 5:
            interrupt_self()
        return original(self, *arguments, **keywords)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def sigint_inside_validation(monkeypatch):
    """Between the second and third forward passes of the validation after step 8."""
    calls = {"validation": 0, "inside": False, "forward": 0}
    original_forward, original_evaluate = Llama.forward, train_module.evaluate_loss

    def forward(self, *arguments, **keywords):
        if calls["inside"] and calls["validation"] == 2:
            calls["forward"] += 1
            if calls["forward"] == 2:
                interrupt_self()
        return original_forward(self, *arguments, **keywords)

    def evaluate_loss(*arguments, **keywords):
        calls["validation"] += 1
        calls["inside"] = True
        try:
            return original_evaluate(*arguments, **keywords)
        finally:
            calls["inside"] = False

    monkeypatch.setattr(Llama, "forward", forward)
    monkeypatch.setattr(train_module, "evaluate_loss", evaluate_loss)


def sigint_at_an_evaluation_boundary(monkeypatch):
    """Right after the checkpoints of step 4 are written."""
    original, sent = train_module.save_checkpoint, []

    def save(path, state):
        original(path, state)
        if path.name == "last.pt" and state["step"] == 4 and not sent:
            sent.append(True)
            interrupt_self()

    monkeypatch.setattr(train_module, "save_checkpoint", save)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt, stopped_at", [
    (sigint_inside_a_step, 6), (sigint_inside_the_optimizer_step, 5), (sigint_inside_validation, 8),
    (sigint_at_an_evaluation_boundary, 4),
])
def test_sigint_anywhere_then_resume_gives_the_uninterrupted_run_bit_for_bit(corpus, straight, tmp_path,
                                                                             monkeypatch, capsys, interrupt,
                                                                             stopped_at):
    out_dir = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        interrupt(patch)
        train(corpus, out_dir)
    assert stopped.value.code == EXIT_INTERRUPTED  # 130: saved, and the shell can tell it from a finished run
    out = capsys.readouterr().out
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == stopped_at
    assert logged(out_dir)[-1]["step"] == stopped_at
    train(corpus, out_dir, "--resume")
    assert f"resumed from {out_dir / 'last.pt'} at step {stopped_at}" in capsys.readouterr().out
    assert_same_run(out_dir, straight)
    stop_line = f"stopped at step {stopped_at}; resume with: python llm/train.py --out-dir {out_dir} --resume"
    assert stop_line in out, out.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigint_from_outside_at_a_random_moment_then_resume_is_exact(corpus, straight, tmp_path, capsys):
    out_dir = tmp_path / "run"
    command = [sys.executable, "llm/train.py", *TINY, *corpus["data"], "--out-dir", str(out_dir)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=ONE_THREAD, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            time.sleep(random.Random(1).uniform(0, 0.05))
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped at step" in stdout
    # the command the run printed: every setting comes from the saved run
    train_module.main(["--out-dir", str(out_dir), "--resume", "--num-samples", "0", "--no-final-eval"])
    capsys.readouterr()
    assert_same_run(out_dir, straight)


def test_a_folder_holding_a_run_is_refused_until_resume_or_overwrite(corpus, straight, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        (out_dir / name).write_bytes((straight / name).read_bytes())
    before = folder_bytes(out_dir)
    with pytest.raises(SystemExit) as refused:
        train(corpus, out_dir)
    message = str(refused.value.code)
    assert message == (f"error: {out_dir} already holds a run (last.pt); pass --resume to continue it, "
                       f"--out-dir DIR to start a new run elsewhere, or --overwrite to replace it")
    with pytest.raises(SystemExit, match="^error: --resume continues the run .* pass only one$"):
        train(corpus, out_dir, "--resume", "--overwrite")
    with pytest.raises(SystemExit, match="is a file, not a folder$"):
        train(corpus, out_dir / "last.pt")
    assert folder_bytes(out_dir) == before
    train(corpus, out_dir, "--overwrite", "--max-steps", "4")  # a fresh run of 4 steps replaces the 12-step one
    assert logged(out_dir)[-1]["step"] == 4 and torch.load(out_dir / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "8", "--batch-size was 4 in the saved run and is 8 now"),
    ("--grad-accum", "1", "--grad-accum was 2 in the saved run and is 1 now"),
    ("--seed", "7", "--seed was 1337 in the saved run and is 7 now"),
    ("--lr", "0.001", "--lr was 0.003 in the saved run and is 0.001 now"),
    ("--max-steps", "20", "--max-steps was 12 in the saved run and is 20 now"),
    ("--d-model", "64", "--d-model was 32 in the saved run and is 64 now"),
    ("--vocab-size", "400", "--vocab-size was 320 in the saved run and is 400 now"),
    ("--dropout", "0.2", "--dropout was 0.1 in the saved run and is 0.2 now"),
    ("WORLD_SIZE", "2", "the process count was 1 in the saved run and is 2 now"),
    ("--text-file", "other", "the training data (--dataset, --text-file) was text-"),
])
def test_resume_refuses_a_changed_setting_in_one_line(corpus, straight, tmp_path, monkeypatch, flag, value,
                                                      message):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "last.pt").write_bytes((straight / "last.pt").read_bytes())
    before = folder_bytes(out_dir)
    arguments = ["--out-dir", str(out_dir), "--resume"]
    if flag == "WORLD_SIZE":
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", value)
    elif flag == "--text-file":
        other = tmp_path / "other.txt"
        other.write_text(corpus["text_file"].read_text()[::-1], encoding="utf-8")
        arguments += ["--text-file", str(other), "--data-dir", str(tmp_path / "data")]
    else:
        arguments += [flag, value]
    with pytest.raises(SystemExit) as refused:
        train_module.main(arguments)
    assert str(refused.value.code).startswith(f"error: {message}")
    assert "\n" not in str(refused.value.code)
    assert folder_bytes(out_dir) == before


def nan_training_loss_from_step(monkeypatch, step: int):
    """Every training forward pass from step `step` on returns a NaN loss (2 micro-batches per step)."""
    original, calls = Llama.forward, {"count": 0}

    def forward(self, *arguments, **keywords):
        logits, loss = original(self, *arguments, **keywords)
        if self.training:
            calls["count"] += 1
            if calls["count"] > 2 * (step - 1):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Llama, "forward", forward)


def nan_validation_loss_from_call(monkeypatch, call: int):
    original, calls = train_module.evaluate_loss, {"count": 0}

    def evaluate_loss(*arguments, **keywords):
        calls["count"] += 1
        loss, tokens = original(*arguments, **keywords)
        return (float("nan") if calls["count"] >= call else loss), tokens

    monkeypatch.setattr(train_module, "evaluate_loss", evaluate_loss)


@pytest.mark.parametrize("what, step, good", [("training", 6, 4), ("validation", 8, 4), ("training", 2, None)])
def test_a_non_finite_loss_stops_the_run_before_any_write(corpus, tmp_path, monkeypatch, capsys, what, step, good):
    out_dir = tmp_path / "run"
    written = {}
    original_save = train_module.save_checkpoint

    def save(path, state):  # keep what the last good save wrote, to compare with the files left afterwards
        original_save(path, state)
        written[path.name] = path.read_bytes()

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    if what == "training":
        nan_training_loss_from_step(monkeypatch, step)
    else:
        nan_validation_loss_from_call(monkeypatch, step // 4)
    with pytest.raises(SystemExit) as stopped:
        train(corpus, out_dir)
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    if good is None:
        assert error == f"error: the {what} loss is not finite at step {step}; stopped without saving: " \
                        "no checkpoint was written yet"
        assert not (out_dir / "last.pt").exists() and not (out_dir / "best.pt").exists()
    else:
        assert error == (f"error: the {what} loss is not finite at step {step}; stopped without saving: "
                         f"{out_dir / 'last.pt'} (step {good}) holds the last good state")
        assert (out_dir / "last.pt").read_bytes() == written["last.pt"]
        assert (out_dir / "best.pt").read_bytes() == written["best.pt"]
        assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == good
    steps = [record["step"] for record in logged(out_dir)]
    assert max(steps, default=0) == step - 1  # the record of the diverged step is not written either


def run_main(module, arguments, monkeypatch, capsys):
    """A CLI's main() in this process with sys.argv set: (exit code, stderr). Any other exception fails the test."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *arguments])
    try:
        module.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    return code, capsys.readouterr().err


ZERO, NEGATIVE, NAN, HUGE = "0", "-1", "nan", "1e400"


@pytest.fixture(scope="module")
def garbage_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("garbage")
    files = {"empty": b"", "text": b"not a checkpoint at all\n", "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
             "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", "zip": b"PK\x03\x04" + b"\x00" * 64}
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(data)
    return paths


def test_every_bad_flag_and_file_of_every_llm_cli_is_one_line_and_harms_nothing(corpus, straight, garbage_files,
                                                                                tmp_path, monkeypatch, capsys):
    import llm.bench
    import llm.eval
    import llm.generate
    import llm.long_context
    import llm.prepare
    import llm.vocab_sweep

    run_folder = tmp_path / "run"
    run_folder.mkdir()
    for name in ("last.pt", "best.pt", "metrics.jsonl", "loss.png"):
        (run_folder / name).write_bytes((straight / name).read_bytes())
    before = folder_bytes(run_folder)
    checkpoint = str(run_folder / "best.pt")
    data = [*corpus["data"], "--out-dir", str(run_folder)]
    cases = []
    # llm/train.py: every numeric flag with the values outside its range
    for flag, values in {
        "--vocab-size": [ZERO, NEGATIVE, NAN, "10000000"], "--d-model": [ZERO, NEGATIVE, NAN],
        "--n-layers": [ZERO, NEGATIVE], "--n-heads": [ZERO, NEGATIVE, "3"], "--n-kv-heads": [ZERO, "3"],
        "--context-length": [ZERO, NEGATIVE, "1000000000"], "--rope-theta": [ZERO, NEGATIVE, NAN, HUGE],
        "--dropout": [NEGATIVE, "1", NAN], "--batch-size": [ZERO, NEGATIVE], "--grad-accum": [ZERO, NEGATIVE],
        "--max-steps": [ZERO, NEGATIVE], "--lr": [ZERO, NEGATIVE, NAN, HUGE], "--min-lr-ratio": [NEGATIVE, "2", NAN],
        "--warmup-steps": [NEGATIVE, NAN], "--weight-decay": [NEGATIVE, NAN, HUGE], "--beta2": [NEGATIVE, "1", NAN],
        "--grad-clip": [NEGATIVE, NAN, HUGE], "--eval-every": [ZERO, NEGATIVE], "--eval-batches": [ZERO, NEGATIVE],
        "--seed": [NEGATIVE, NAN, str(2**64)], "--num-samples": [NEGATIVE], "--sample-tokens": [ZERO, NEGATIVE],
        "--stop-at-step": [NEGATIVE], "--device": ["foo", "cuda:99" if torch.cuda.is_available() else "cuda"],
    }.items():
        cases += [(train_module, [*TINY, *data, "--overwrite", flag, value]) for value in values]
    # a new run into the folder, and --resume from every kind of garbage last.pt
    cases.append((train_module, [*TINY, *data]))
    for path in garbage_files.values():
        garbage_run = tmp_path / f"resume-{path.stem}"
        garbage_run.mkdir()
        (garbage_run / "last.pt").write_bytes(path.read_bytes())
        cases.append((train_module, ["--out-dir", str(garbage_run), "--resume"]))
    # the other CLIs
    for flag, values in {"--batch-size": [ZERO, NEGATIVE, NAN], "--context-length": [ZERO, NEGATIVE, "1000000000"],
                         "--stride": [ZERO, NEGATIVE, "1000000"], "--device": ["foo"]}.items():
        cases += [(llm.eval, ["--checkpoint", checkpoint, flag, value]) for value in values]
    for flag, values in {"--max-new-tokens": [ZERO, NEGATIVE], "--temperature": [NEGATIVE, NAN, HUGE],
                         "--top-k": [NEGATIVE], "--top-p": [ZERO, NEGATIVE, "1.5", NAN], "--num-samples": [ZERO],
                         "--seed": [NEGATIVE, str(2**70)], "--device": ["foo"]}.items():
        cases += [(llm.generate, ["--checkpoint", checkpoint, "--prompt", "ka", flag, value]) for value in values]
    for flag, values in {"--max-windows": [ZERO, NEGATIVE], "--batch-size": [ZERO, NEGATIVE],
                         "--factors": [ZERO, NEGATIVE, NAN, "100000000"], "--device": ["foo"]}.items():
        cases += [(llm.long_context, ["--checkpoint", checkpoint, "--out-dir", str(tmp_path / "long"), flag, value])
                  for value in values]
    cases.append((llm.long_context, ["--checkpoint", checkpoint, "--out-dir", str(run_folder / "loss.png" / "long")]))
    for path in garbage_files.values():
        cases += [(llm.eval, ["--checkpoint", str(path)]), (llm.generate, ["--checkpoint", str(path)]),
                  (llm.long_context, ["--checkpoint", str(path), "--out-dir", str(tmp_path / "long")])]
    for flag, values in {"--train-steps": [ZERO, NEGATIVE, NAN], "--gen-lengths": [ZERO, NEGATIVE, "x"],
                         "--device": ["foo"]}.items():
        cases += [(llm.bench, [flag, value, "--out", str(tmp_path / "bench.json")]) for value in values]
    for flag, values in {"--base-steps": [ZERO, NEGATIVE, NAN], "--batch-size": [ZERO, NEGATIVE],
                         "--vocab-sizes": [ZERO, NEGATIVE, NAN]}.items():
        cases += [(llm.vocab_sweep, [flag, value, "--out-dir", str(tmp_path / "sweep")]) for value in values]
    for value in (ZERO, NEGATIVE, NAN, "10000000"):
        cases.append((llm.prepare, ["tokenizer", "--vocab-size", value, "--text-file", str(corpus["text_file"]),
                                    "--data-dir", str(corpus["data_dir"])]))
    for module, arguments in cases:
        code, stderr = run_main(module, arguments, monkeypatch, capsys)
        shown = f"{Path(module.__file__).name} {' '.join(arguments[-3:])}: {stderr[-400:]}"
        assert code != 0 and "Traceback" not in stderr, shown
        last_line = stderr.strip().splitlines()[-1]
        assert "error:" in last_line and "weights_only=False" not in stderr, shown
        if "--resume" in arguments and module is train_module:
            assert "is not a readable llm checkpoint" in last_line, shown
    assert folder_bytes(run_folder) == before
    assert not (tmp_path / "long").exists() and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "bench.json").exists()
    for path in garbage_files.values():  # a refused resume leaves the garbage it found as it was
        assert (tmp_path / f"resume-{path.stem}" / "last.pt").read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_a_garbage_checkpoint_through_the_real_command_line_is_one_line(garbage_files):
    path = garbage_files["text"]
    result = subprocess.run([sys.executable, "llm/generate.py", "--checkpoint", str(path)], cwd=REPO_ROOT,
                            env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {path} is not a readable llm checkpoint "
                                     "(it holds something other than tensors and plain values)")


def test_a_truncated_or_altered_token_file_is_detected_and_made_again(corpus, tmp_path):
    arguments = ("text", 320, tmp_path / "data", str(corpus["text_file"]))
    prepared = prepare(*arguments, log=lambda *a: None)
    train_file = prepared.token_files["train"]
    good = train_file.read_bytes()
    train_file.write_bytes(good[: len(good) // 2])  # a copy cut short
    prepare(*arguments, log=lambda *a: None)
    assert train_file.read_bytes() == good
    altered = bytearray(good)
    altered[len(good) // 2] ^= 0xFF  # the same size, one byte changed
    train_file.write_bytes(bytes(altered))
    prepare(*arguments, log=lambda *a: None)
    assert train_file.read_bytes() == good


def torchrun(arguments, port: int, **keywords):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "llm/train.py", *arguments], cwd=REPO_ROOT, env=ONE_THREAD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **keywords)


@pytest.mark.slow
def test_ddp_ctrl_c_on_one_rank_stops_all_together_and_validation_matches_one_process(corpus, tmp_path, capsys):
    """2 gloo processes of batch 2 against one of batch 4 (the same global batch, dropout off):

    a Ctrl-C that reaches only rank 1 stops both ranks at the same step and rank 0 saves; both validations
    score the same windows (equal losses); only rank 0 prepares the data (the split files are not rewritten).
    """
    common = [*TINY, *corpus["data"], "--max-steps", "300", "--eval-every", "2", "--grad-accum", "1", "--dropout", "0"]
    single, distributed = tmp_path / "single", tmp_path / "ddp"
    train_module.main([*common, "--batch-size", "4", "--out-dir", str(single), "--stop-at-step", "4"])
    capsys.readouterr()
    split_texts = sorted(corpus["data_dir"].glob("text-*/text/*.txt"))
    modified = [path.stat().st_mtime_ns for path in split_texts]
    process = torchrun([*common, "--batch-size", "2", "--out-dir", str(distributed)], 29637)
    metrics, deadline = distributed / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    rank_one = [pid for pid in children if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")]
    assert rank_one, children
    os.kill(int(rank_one[0]), signal.SIGINT)  # only one rank hears it
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the ranks did not stop together: one waits for the other in a collective")
    assert "exitcode: 130" in stderr, stderr[-2000:]  # every rank saved (rank 0) and exited as interrupted
    saved = torch.load(distributed / "last.pt", weights_only=True)
    assert f"stopped at step {saved['step']}; resume with" in stdout
    assert 4 <= saved["step"] == logged(distributed)[-1]["step"] < 300
    ours, theirs = ({record["step"]: record for record in logged(folder)} for folder in (distributed, single))
    for step in (2, 4):  # the same weights (to rounding), validated on the same windows
        assert ours[step]["val_loss"] == pytest.approx(theirs[step]["val_loss"], abs=2e-5)
    assert [path.stat().st_mtime_ns for path in split_texts] == modified  # nobody rewrote the split files


def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(corpus, straight, tmp_path, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(straight, out_dir)  # trained on one thread
    with torch_threads(2):
        train(corpus, out_dir, "--resume")
    warning = capsys.readouterr().err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in warning and "bit-identical" in warning
