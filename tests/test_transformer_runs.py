"""Run handling of the Transformer chapter: Ctrl-C then --resume is exact, runs are never overwritten, a diverging
loss writes nothing, and every bad flag or file of every CLI ends in one line with the run folder untouched."""

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

import transformer.eval as eval_module
import transformer.train as train_module
from transformer import bench, figures, prepare
from transformer.prepare import load_pairs, train_tokenizer
from transformer.runs import (
    EXIT_INTERRUPTED,
    CheckpointError,
    RunError,
    check_run_folder,
    refuse_changed_settings,
    remove_run_files,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--num-heads", "2", "--d-ff", "64", "--vocab-size", "300", "--train-fraction", "0.005",
        "--valid-pairs", "50", "--valid-bleu-sentences", "10", "--no-progress", "--threads", "1"]
# 12 steps of one epoch (12 batches) with dropout 0.1 and the weight average on; validation every 4 steps
RUN = [*TINY, "--max-steps", "12", "--valid-every", "4"]
COUNTERS = ("step", "epoch", "batch_in_epoch")  # where a transformer checkpoint stands


@pytest.fixture(scope="module")
def cached_pairs():
    """Tatoeba's pairs, parsed once for the module (each training run would otherwise parse them again)."""
    return load_pairs()


@pytest.fixture(autouse=True)
def fast_data(monkeypatch, cached_pairs):
    monkeypatch.setattr(train_module, "load_pairs", lambda: cached_pairs)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cached_pairs):
    """The reference: the tiny run, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "load_pairs", lambda: cached_pairs)
        train_module.main([*RUN, "--out-dir", str(out)])
    return out


@pytest.mark.slow
def test_ctrl_c_inside_a_step_inside_validation_and_at_an_evaluation_boundary_resumes_exactly(
    straight_run, tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "run")
    with monkeypatch.context() as patch:  # inside step 2: during its forward pass
        sigint_on_call(patch, train_module, "label_smoothed_cross_entropy", 2)
        stopped_by_ctrl_c(train_module.main, [*RUN, "--out-dir", out])
    assert f"stopped at step 2; resume with: python transformer/train.py --out-dir {out} --resume" in \
        capsys.readouterr().out
    with monkeypatch.context() as patch:  # inside the validation at step 4, while it decodes for BLEU
        sigint_on_call(patch, train_module, "translate", 1)
        stopped_by_ctrl_c(train_module.main, [*RUN, "--out-dir", out, "--resume"])
    assert "stopped at step 4;" in capsys.readouterr().out
    assert len(logged(tmp_path / "run")) == 1 and (tmp_path / "run" / "best.pt").exists()
    with monkeypatch.context() as patch:  # right after the validation at step 8 has saved and drawn its curves
        sigint_on_call(patch, train_module, "plot_curves", 1, after=True)
        stopped_by_ctrl_c(train_module.main, [*RUN, "--out-dir", out, "--resume"])
    assert "stopped at step 8;" in capsys.readouterr().out
    train_module.main([*RUN, "--out-dir", out, "--resume"])
    assert_same_run(tmp_path / "run", straight_run, counters=COUNTERS, weights=("model", "raw_model"))


@pytest.mark.slow
def test_a_real_ctrl_c_from_outside_stops_cleanly_and_resumes_exactly(straight_run, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "transformer/train.py", *RUN, "--out-dir", str(out)], cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # during or just after the first validation (step 4)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in stderr, stderr
    stopped = re.search(r"stopped at step (\d+); resume with: python transformer/train.py --out-dir (\S+) --resume",
                        stdout)
    assert stopped and 4 <= int(stopped[1]) < 12 and stopped[2] == str(out), stdout
    train_module.main([*RUN, "--out-dir", str(out), "--resume"])
    assert_same_run(out, straight_run, counters=COUNTERS, weights=("model", "raw_model"))


def test_a_folder_that_holds_a_run_is_refused_and_overwrite_replaces_only_its_files(straight_run, tmp_path, capsys):
    before = folder_bytes(straight_run)
    with pytest.raises(SystemExit) as refused:
        train_module.main([*RUN, "--out-dir", str(straight_run)])
    assert str(refused.value.code) == (
        f"error: {straight_run} already holds a run (last.pt); pass --resume to continue it, --out-dir DIR to "
        "start a new run elsewhere, or --overwrite to replace it")
    with pytest.raises(SystemExit, match="pass only one"):
        train_module.main([*RUN, "--out-dir", str(straight_run), "--resume", "--overwrite"])
    assert folder_bytes(straight_run) == before
    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    (copy / "notes.txt").write_text("mine")
    check_run_folder(copy, resume=False, overwrite=True)
    remove_run_files(copy, train_module.RUN_FILES)
    assert sorted(path.name for path in copy.iterdir()) == ["notes.txt"]
    with pytest.raises(RunError, match="does not exist"):
        check_run_folder(tmp_path / "empty", resume=True, overwrite=False)


def test_a_changed_setting_is_refused_on_resume_but_epochs_may_grow(straight_run):
    before = folder_bytes(straight_run)
    for flag, saved, value in [("--seed", "0", "1"), ("--max-tokens", "1500", "1000"), ("--dropout", "0.1", "0.2"),
                               ("--warmup-steps", "400", "10")]:
        with pytest.raises(SystemExit) as refused:
            train_module.main([*RUN, "--out-dir", str(straight_run), "--resume", flag, value])
        assert str(refused.value.code) == (f"error: {flag} was {saved} in the saved run and is {value} now; "
                                           "a resumed run keeps its settings (start a new run with --out-dir)")
    assert folder_bytes(straight_run) == before
    # the Noam schedule does not depend on the epoch count, so `--resume --epochs 6` continues the same run
    assert "epochs" not in train_module.FIXED_ON_RESUME
    short, long = (train_module.parse_args(["--epochs", epochs]) for epochs in ("4", "6"))
    assert [train_module.learning_rate(s, short) for s in range(1, 2000, 37)] == \
        [train_module.learning_rate(s, long) for s in range(1, 2000, 37)]


def test_quick_is_a_preset_of_flags_that_a_resume_keeps():
    quick = train_module.parse_args(["--quick"])
    for name, value in train_module.QUICK_PRESET.items():
        assert getattr(quick, name) == value, name
    assert quick.d_model < train_module.parse_args([]).d_model and quick.out_dir == "runs/transformer-quick"
    # a flag beside --quick wins over the preset, as `--quick --resume --epochs 2` needs
    assert train_module.parse_args(["--quick", "--epochs", "2"]).epochs == 2
    assert train_module.parse_args(["--quick", "--d-model", "64"]).d_model == 64
    saved = vars(quick)
    refuse_changed_settings(saved, vars(train_module.parse_args(["--quick", "--epochs", "2"])),
                            train_module.FIXED_ON_RESUME)  # passes: only --epochs changed
    with pytest.raises(CheckpointError, match="^--quick was True in the saved run and is False now"):
        refuse_changed_settings(saved, vars(train_module.parse_args([])), train_module.FIXED_ON_RESUME)


def test_the_default_flags_build_the_default_model_config():
    assert train_module.model_config(train_module.parse_args([]), 8000) == train_module.TransformerConfig()


def test_a_non_finite_loss_stops_before_any_write(straight_run, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    before = folder_bytes(copy)
    original_loss = train_module.label_smoothed_cross_entropy
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "label_smoothed_cross_entropy",
                      lambda *arguments: original_loss(*arguments) * float("nan"))
        with pytest.raises(SystemExit) as diverged:
            train_module.main([*RUN, "--out-dir", str(copy), "--resume", "--max-steps", "16"])
        assert str(diverged.value.code) == (f"error: the training loss is not finite at step 13; stopped without "
                                            f"saving: {copy / 'last.pt'} (step 12) holds the last good state")
        with pytest.raises(SystemExit, match="no checkpoint was written yet"):
            train_module.main([*RUN, "--out-dir", str(tmp_path / "fresh")])
    assert folder_bytes(copy) == before
    assert not (tmp_path / "fresh" / "last.pt").exists()
    original_validate = train_module.validate
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "validate",
                      lambda *arguments: {**original_validate(*arguments), "valid_loss": float("nan")})
        with pytest.raises(SystemExit) as diverged:
            train_module.main([*RUN, "--out-dir", str(copy), "--resume", "--max-steps", "13"])
        assert str(diverged.value.code).startswith("error: the validation loss is not finite at step 13; stopped "
                                                   "without saving:")
    assert folder_bytes(copy) == before


# every numeric flag of every CLI with values its range refuses (0 only where 0 is not allowed, huge only where it
# does not fit); any of them that were accepted would train, decode or draw, and change the run folder
TRAIN_REFUSED = {
    "--epochs": ["0", "-1", "nan", "1.5"], "--max-tokens": ["0", "-1", "nan", "10000000"],
    "--max-len": ["0", "-1", "nan", "100000"], "--vocab-size": ["0", "-1", "nan", "10000000"],
    "--d-model": ["0", "-1", "nan", "100000", "33"], "--num-heads": ["0", "-1", "nan", "1000", "3"],
    "--encoder-layers": ["0", "-1", "nan", "1000"], "--decoder-layers": ["0", "-1", "nan", "1000"],
    "--d-ff": ["0", "-1", "nan", "10000000"], "--dropout": ["-1", "nan", "1", "inf"],
    "--average-decay": ["-1", "nan", "1"], "--label-smoothing": ["-1", "nan", "1"],
    "--warmup-steps": ["0", "-1", "nan"], "--lr-factor": ["0", "-1", "nan", "inf"], "--lr": ["0", "-1", "nan", "inf"],
    "--train-fraction": ["0", "-1", "nan", "1.5"], "--valid-pairs": ["-1", "nan"],
    "--valid-bleu-sentences": ["0", "-1", "nan"], "--valid-every": ["-1", "nan"], "--max-steps": ["-5", "nan"],
    "--seed": ["-1", "nan", str(2**64)], "--threads": ["-1", "nan", "100000"], "--device": ["foo"],
}
EVAL_REFUSED = {
    "--beam-size": ["0", "-1", "nan", "100000"], "--length-penalty": ["-1", "nan", "inf"], "--limit": ["-1", "nan"],
    "--batch-size": ["0", "-1", "nan", "10000000"], "--examples": ["-1", "nan"], "--device": ["foo"],
    "--translate": ["", "  ", "caf\udce9 \udcff\udcfe"],  # the last: bytes that are not UTF-8, as argv hands them over
}
BENCH_REFUSED = {"--repeats": ["0", "-1", "nan"], "--beam-sentences": ["0", "-1", "nan"],
                 "--threads": ["-1", "nan", "100000"], "--device": ["foo"]}
FIGURES_REFUSED = {"--d-model": ["0", "-1", "nan", "33", "100000"]}
PREPARE_REFUSED = {"--vocab-size": ["0", "-1", "nan", "10000000"], "--seed": ["-1", "nan", str(2**64)]}


def test_every_cli_refuses_out_of_range_flags_and_unreadable_checkpoints_with_one_line(straight_run, tmp_path,
                                                                                        capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = folder_bytes(run)
    checkpoint = str(run / "best.pt")
    for flag, values in TRAIN_REFUSED.items():
        for value in values:
            refused(train_module.main, [*RUN, "--out-dir", str(run), "--resume", flag, value], capsys)
    for flag, values in EVAL_REFUSED.items():
        for value in values:
            refused(eval_module.main, ["--checkpoint", checkpoint, flag, value], capsys)
    for main, table in [(bench.main, BENCH_REFUSED), (figures.main, FIGURES_REFUSED)]:
        for flag, values in table.items():
            for value in values:
                refused(main, ["--checkpoint" if main is bench.main else "--out", str(run), flag, value], capsys)
    for flag, values in PREPARE_REFUSED.items():
        for value in values:
            refused(prepare.main, [flag, value], capsys)
    a_file = run / "metrics.jsonl"
    refused(train_module.main, [*RUN, "--out-dir", str(a_file)], capsys)
    refused(train_module.main, [*RUN, "--out-dir", str(a_file / "below")], capsys)
    refused(eval_module.main, ["--checkpoint", checkpoint, "--out-dir", str(a_file)], capsys)
    refused(figures.main, ["--out", str(a_file)], capsys)
    refused(figures.main, ["--out", str(run / "picture.png")], capsys)
    assert folder_bytes(run) == before

    real = (run / "last.pt").read_bytes()
    garbage = {"empty": b"", "text": b"not a checkpoint\n", "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
               "truncated": real[: len(real) // 2]}
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"kind": "transformer-translation", "config": {}, "model": {}, "tokenizer": torch.zeros(1),
                "split": {}, "step": 0, "pickled": Path("x")}, tmp_path / "pickled.pt")
    for name, content in garbage.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    for name in [*garbage, "foreign", "pickled"]:
        path = str(tmp_path / f"{name}.pt")
        shutil.copy(path, run / "last.pt")
        message = refused(train_module.main, [*RUN, "--out-dir", str(run), "--resume"], capsys)
        assert message.startswith(f"error: {run / 'last.pt'} is not a readable transformer checkpoint ("), message
        for main in (eval_module.main, bench.main):
            message = refused(main, ["--checkpoint", path], capsys)
            assert message.startswith(f"error: {path} is not a readable transformer checkpoint ("), message
    (run / "last.pt").write_bytes(real)
    message = refused(eval_module.main, ["--checkpoint", str(run)], capsys)
    assert message == f"error: {run} is not a readable transformer checkpoint (it is not a file)"
    assert folder_bytes(run) == before


def test_a_vocabulary_too_large_for_the_sentences_is_one_line(cached_pairs):
    with pytest.raises(ValueError, match=r"^--vocab-size 50000: SentencePiece cannot build this vocabulary \("):
        train_tokenizer(cached_pairs[:200], 50000)


def test_translate_reads_every_sentence_of_a_long_text(straight_run, monkeypatch, capsys):
    seen = []
    original = eval_module.translate

    def recording(model, processor, sentences, *arguments, **keywords):
        seen.extend(sentences)
        return original(model, processor, sentences, *arguments, **keywords)

    monkeypatch.setattr(eval_module, "translate", recording)
    text = " ".join(f"I saw {number} birds in the garden today." for number in range(40))  # 360 words
    eval_module.main(["--checkpoint", str(straight_run / "best.pt"), "--translate", text, "--beam-size", "1",
                      "--device", "cpu"])
    assert len(seen) == 40 and seen[7] == "I saw 7 birds in the garden today."
    assert capsys.readouterr().out.strip()
    message = refused(eval_module.main, ["--checkpoint", str(straight_run / "best.pt"), "--translate",
                                         "birds " * 300, "--device", "cpu"], capsys)
    assert re.fullmatch(r"error: a sentence of --translate is \d+ tokens long; the model reads at most 255 .*", message)


def test_figures_write_into_the_folder_they_are_given(tmp_path):
    figures.main(["--out", str(tmp_path / "pictures"), "--d-model", "32"])
    assert [path.name for path in (tmp_path / "pictures").iterdir()] == ["positional_encoding.png"]


def test_a_resume_at_another_thread_count_warns_that_it_is_not_bit_identical(straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)  # trained on one thread (--threads 1)
    with torch_threads(1):
        train_module.main([*RUN, "--out-dir", str(run), "--resume", "--threads", "2"])
    warning = capsys.readouterr().err
    assert "warning: the saved run used 1 CPU threads and this one uses 2" in warning and "bit-identical" in warning
