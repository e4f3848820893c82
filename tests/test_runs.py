"""runs.py, the run helper every chapter carries: six byte-for-byte copies, a docstring that names what it holds,
and the promises the chapters rely on (checked once here on the llm copy, which is the same file)."""

import argparse
import ast
import math
from pathlib import Path

import pytest
import torch

from llm import runs

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ("llm", "transformer", "cnn", "rnn", "lstm", "gru")


def test_every_chapter_carries_the_same_runs_py_byte_for_byte():
    copies = {chapter: (REPO_ROOT / chapter / "runs.py").read_bytes() for chapter in CHAPTERS}
    different = [chapter for chapter, content in copies.items() if content != copies["llm"]]
    assert not different, f"runs.py of {', '.join(different)} differs from llm/runs.py: copy one file to all six"


def test_runs_py_imports_nothing_of_any_chapter():
    tree = ast.parse((REPO_ROOT / "llm" / "runs.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {*CHAPTERS, "data"}, imported


def test_the_docstring_names_every_public_name():
    source = (REPO_ROOT / "llm" / "runs.py").read_text()
    tree = ast.parse(source)
    public = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    public |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    public = {name for name in public if not name.startswith("_") and name != "LARGEST_INT"}
    missing = [name for name in sorted(public) if name not in ast.get_docstring(tree)]
    assert not missing, missing


@pytest.mark.parametrize("parse, text", [
    (runs.positive_int, "0"), (runs.positive_int, "1.5"), (runs.positive_int, str(2**63)),
    (runs.non_negative_int, "-1"), (runs.seed_int, str(2**32)), (runs.int_in_range(1, 4), "5"),
    (runs.positive_int_list, "8,0"), (runs.positive_float, "0"), (runs.non_negative_float, "-1e-9"),
    (runs.finite_float, "inf"), (runs.probability, "1"), (runs.fraction, "1.01"),
    *((parse, text) for parse in (runs.positive_float, runs.non_negative_float, runs.finite_float, runs.probability,
                                  runs.fraction) for text in ("nan", "-inf", "1e400", "x")),
])
def test_every_argparse_type_refuses_values_outside_its_range_with_the_range_named(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'[^']*' is not (a|an) "):  # '0' is not a positive integer
        parse(text)


def test_every_argparse_type_accepts_the_ends_of_its_range():
    assert runs.positive_int("1") == 1 and runs.non_negative_int("0") == 0 and runs.seed_int(str(2**32 - 1))
    assert runs.int_in_range(1, 4)("4") == 4 and runs.positive_int_list("128, 512") == [128, 512]
    assert runs.probability("0") == 0 and runs.fraction("1") == 1 and runs.finite_float("-2.5") == -2.5
    assert math.isclose(runs.positive_float("1e-30"), 1e-30)


def test_pick_device_takes_the_cpu_as_asked_and_refuses_an_unknown_or_missing_device_in_one_line():
    assert runs.pick_device("cpu") == torch.device("cpu")
    assert runs.pick_device("auto").type in ("cuda", "mps", "cpu")
    for name in ("foo", "meta", "gpu"):
        with pytest.raises(runs.RunError, match=f"^unknown device {name!r} \\(use auto, cpu, cuda or mps\\)$"):
            runs.pick_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(runs.RunError, match="CUDA is not available"):
            runs.pick_device("cuda")


def test_a_checkpoint_problem_is_a_run_error_and_a_run_error_a_value_error():
    assert issubclass(runs.CheckpointError, runs.RunError) and issubclass(runs.RunError, ValueError)


def test_check_run_folder_changes_nothing_and_remove_run_files_removes_only_the_run_files(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"weights")
    (tmp_path / "adding-lstm-6-best.pt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunError, match=r"already holds a run \(last.pt\); pass --resume"):
        runs.check_run_folder(tmp_path, resume=False, overwrite=False)
    runs.check_run_folder(tmp_path, resume=False, overwrite=True)  # refuses nothing, removes nothing
    runs.check_run_folder(tmp_path, resume=True, overwrite=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adding-lstm-6-best.pt", "last.pt", "notes.txt"]
    runs.remove_run_files(tmp_path, ("last.pt", "best.pt", "adding-*-best.pt"))
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(runs.RunError, match="does not exist"):
        runs.check_run_folder(tmp_path, resume=True, overwrite=False)


def test_a_checkpoint_is_written_whole_or_not_at_all_and_loads_tensors_only(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 4})
    assert not path.with_name("last.pt.tmp").exists()

    def crash(*arguments, **keywords):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        runs.save_checkpoint(path, {"model": {}, "step": 5})
    monkeypatch.undo()
    assert runs.load_checkpoint(path, "llm", ("model", "step"))["step"] == 4  # the good checkpoint is still there
    with pytest.raises(runs.CheckpointError, match=r"is not a readable llm checkpoint \(it lacks config\)$"):
        runs.load_checkpoint(path, "llm", ("model", "config"))
    torch.save({"model": {}, "path": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(runs.CheckpointError, match="it holds something other than tensors and plain values"):
        runs.load_checkpoint(tmp_path / "pickled.pt", "llm")


def test_a_changed_setting_is_refused_in_one_sentence_naming_the_flag():
    saved = {"batch_size": 4, "books": ["a.txt", "b.txt"], "world_size": 1, "lr": 0.1}
    runs.refuse_changed_settings(saved, {**saved, "lr": 0.2}, ["batch_size", "books", "world_size"])
    with pytest.raises(runs.CheckpointError, match="^--batch-size was 4 in the saved run and is 8 now; a resumed "
                                                   r"run keeps its settings \(start a new run with --out-dir\)$"):
        runs.refuse_changed_settings(saved, {**saved, "batch_size": 8}, ["batch_size"])
    with pytest.raises(runs.CheckpointError, match="^--books was a.txt b.txt in the saved run and is a.txt now"):
        runs.refuse_changed_settings(saved, {**saved, "books": ["a.txt"]}, ["books"])
    with pytest.raises(runs.CheckpointError, match="^the process count was 1 in the saved run and is 2 now"):
        runs.refuse_changed_settings(saved, {**saved, "world_size": 2}, ["world_size"],
                                     {"world_size": "the process count"})


def test_a_resume_at_another_thread_count_warns_in_one_line_and_at_the_same_count_says_nothing(capsys):
    runs.warn_if_threads_changed(torch.get_num_threads())
    runs.warn_if_threads_changed(None)  # a checkpoint from before the thread count was recorded
    assert capsys.readouterr().err == ""
    runs.warn_if_threads_changed(torch.get_num_threads() + 1)
    warning = capsys.readouterr().err
    assert warning.startswith("warning: ") and len(warning.splitlines()) == 1
    assert "bit-identical" in warning and "same thread count" in warning
