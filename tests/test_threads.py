"""Every training script takes its thread count from --threads, else from OMP_NUM_THREADS, else its own default."""

import importlib

import pytest
import torch

# (train module, its default thread count when neither --threads nor OMP_NUM_THREADS is given; None: torch's own,
# one per core, left as it is)
CHAPTERS = [("cnn.train", 1), ("rnn.train", 1), ("lstm.train", 1), ("gru.train", 1), ("llm.train", None)]


@pytest.fixture
def restored_threads():
    """The test process's thread count, put back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def stopped_early(module, tmp_path, capsys, *arguments):
    """Run the script's main into an --out-dir that is a file: it sets its threads, then refuses in one line."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        code = module.main([*arguments, "--out-dir", str(a_file)])
        raise SystemExit(code)
    assert stopped.value.code not in (0, None)
    assert a_file.read_text() == "not a folder"
    capsys.readouterr()


@pytest.mark.parametrize(("name", "default"), CHAPTERS)
def test_threads_come_from_the_flag_then_omp_num_threads_then_the_chapters_default(name, default, tmp_path, capsys,
                                                                                   monkeypatch, restored_threads):
    module = importlib.import_module(name)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(3)
    stopped_early(module, tmp_path, capsys, "--threads", "2")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)
    stopped_early(module, tmp_path, capsys)
    assert torch.get_num_threads() == (default or 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch read it at start-up; the script leaves that count alone
    torch.set_num_threads(3)
    stopped_early(module, tmp_path, capsys)
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize(("name", "default"), CHAPTERS)
def test_a_thread_count_out_of_range_is_refused_by_argparse(name, default, capsys):
    module = importlib.import_module(name)
    for value in ("0", "-1", "nan", "100000"):
        with pytest.raises(SystemExit) as stopped:
            module.main(["--threads", value])
        assert stopped.value.code == 2 and "--threads" in capsys.readouterr().err
