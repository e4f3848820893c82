"""Shared test set-up (seeding, the data mirror, a chapter's CLI in a subprocess) and the helpers every chapter's
tests use: one thread, logged records, two runs compared bit for bit, a real Ctrl-C, one-line errors."""

import json
import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO_ROOT.parent / "shared" / "data"

# Tests read real data through the data helper. Where the shared local mirror sits beside the
# checkout (CI, the developers' machines), use it so that no test needs the network.
if "HCL_DATA_MIRROR" not in os.environ and SHARED_MIRROR.is_dir():
    os.environ["HCL_DATA_MIRROR"] = str(SHARED_MIRROR)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_cli():
    """Run `python <script> <args>` from the repository root; return the CompletedProcess."""

    def run(script: str, *arguments: str, timeout: float = 300, env: dict | None = None):
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / script), *arguments],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    return run


# ---- What the chapters' tests share. A test module imports these with `from conftest import ...`. ----

# Logged fields that measure time (or the machine) rather than the run: they are not meant to repeat.
TIMINGS = frozenset({"seconds", "elapsed_seconds", "train_seconds", "first_step_s", "tokens_per_s", "mfu",
                     "chars_per_second", "train_target_tokens_per_s", "threads"})


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole module, as the subprocesses run (OMP_NUM_THREADS=1): in- and out-of-process
    runs then agree bit for bit. Module-scoped, so that a module's trained reference runs on one thread too
    (a module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    with torch_threads(1):
        yield


@contextmanager
def torch_threads(count: int):
    """torch on `count` CPU threads inside the block, the thread count before it afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def without_timings(record):
    """A logged record (and the records nested in it) without its TIMINGS fields."""
    if not isinstance(record, dict):
        return record
    return {key: without_timings(value) for key, value in record.items() if key not in TIMINGS}


def logged(folder: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, without the fields that measure time."""
    lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    return [without_timings(json.loads(line)) for line in lines if line.strip()]


def folder_bytes(folder: Path) -> dict:
    """The bytes of every file under a folder, by relative path (a missing folder: empty): to prove that a refused
    command changed nothing."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_same_run(actual: Path, expected: Path, counters=("step",), weights=("model",),
                    checkpoints=("last.pt", "best.pt")):
    """Two runs are one bit for bit: every logged number, and in each checkpoint the counters, every weight tensor
    and the optimizer's state."""
    assert logged(actual) == logged(expected)
    for name in checkpoints:
        ours, theirs = (torch.load(Path(folder) / name, weights_only=True) for folder in (actual, expected))
        assert [ours[key] for key in counters] == [theirs[key] for key in counters], name
        for key in weights:
            assert ours[key].keys() == theirs[key].keys(), (name, key)
            for tensor_name, tensor in theirs[key].items():
                assert torch.equal(ours[key][tensor_name], tensor), (name, key, tensor_name)
        for index, state in theirs.get("optimizer", {}).get("state", {}).items():
            for key, value in state.items():
                same = torch.equal(ours["optimizer"]["state"][index][key], value) if torch.is_tensor(value) else \
                    ours["optimizer"]["state"][index][key] == value
                assert same, (name, "optimizer", index, key)


def sigint_on_call(monkeypatch, owner, name: str, call, after: bool = False) -> dict:
    """Replace owner.name by a wrapper that sends this process a real SIGINT on one call: the call-th (an int), or
    the first for which call(count, arguments) holds; before the original runs, or after it. The returned dict's
    "sent" says whether the signal went."""
    original, calls = getattr(owner, name), {"count": 0, "sent": False}

    def wrapper(*arguments, **keywords):
        calls["count"] += 1
        now = not calls["sent"] and (call(calls["count"], arguments) if callable(call) else calls["count"] == call)
        if now and not after:
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        result = original(*arguments, **keywords)
        if now and after:
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def stopped_by_ctrl_c(main, arguments):
    """Run a training script's main(argv) that a Ctrl-C stops: it saves, then exits with 130 (EXIT_INTERRUPTED)."""
    with pytest.raises(SystemExit) as stopped:
        main([str(argument) for argument in arguments])
    assert stopped.value.code == 130, stopped.value.code


def call_main(main, arguments, capsys):
    """A script's main(argv) in this process: (exit status, stdout, stderr). A status that sys.exit gives as a
    message counts as 1, and the message joins stderr; an uncaught exception fails the test with its traceback."""
    capsys.readouterr()
    message = ""
    try:
        code = main([str(argument) for argument in arguments]) or 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        message = exit_.code + "\n" if isinstance(exit_.code, str) else ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err + message


def refused(main, arguments, capsys) -> str:
    """Run a CLI's main in this process; it must exit non-zero with one line (argparse adds its usage): that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code not in (0, None), arguments
    error = capsys.readouterr().err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")
    assert "Traceback" not in error and "weights_only" not in error, error
    assert error.strip().splitlines()[-1].startswith(("error:", f"{Path(sys.argv[0]).name}: error:")), error
    return error.strip().splitlines()[-1]


def assert_one_line_error(result, fragment: str = "", only_line: bool = True):
    """A user error in a finished process: non-zero exit, no traceback, and an 'error:' line holding `fragment` as
    the last line of stderr (its only one, unless only_line=False allows progress lines before it)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[data]")]
    assert lines and lines[-1].startswith("error:") and fragment in lines[-1], result.stderr[-1000:]
    assert len(lines) == 1 or not only_line, result.stderr[-1000:]


def tiny_llama_config(**overrides):
    """A Llama small enough to train in a test: 2 layers of width 32, grouped-query attention (4 heads, 2 for K/V)."""
    from llm.model import LlamaConfig

    settings = dict(vocab_size=97, context_length=24, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32)
    settings.update(overrides)
    return LlamaConfig(**settings)


def made_up_text_file(path: Path) -> Path:
    """1,200 lines of 150 made-up words of one to three syllables (seeded): a corpus a tiny tokenizer and model learn
    quickly. Written to path; returns it."""
    generator = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el"]
    words = ["".join(generator.choice(syllables) for _ in range(generator.randint(1, 3))) for _ in range(150)]
    lines = [" ".join(generator.choice(words) for _ in range(generator.randint(6, 14))) + "." for _ in range(1200)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_llm_in_process(*arguments: str):
    """Run llm/train.py's main in this process (saves the interpreter start-up of a subprocess)."""
    from llm.train import main

    main(list(arguments))
