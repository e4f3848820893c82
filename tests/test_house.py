"""House rules that hold across the chapters: every function fits on a screen."""

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("llm", "transformer", "cnn", "rnn", "lstm", "gru", "data")
LONGEST_FUNCTION = 60  # lines from `def` to its last line, decorators not counted; nanoGPT's longest is 55


def function_lengths(path: Path):
    """(name, first line, length in lines) of every function and method in one file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_a_chapter_runs_past_sixty_lines():
    files = sorted(path for folder in FOLDERS for path in (REPO_ROOT / folder).rglob("*.py"))
    assert len(files) > 50, "the chapters' sources were not found"
    too_long = [f"{path.relative_to(REPO_ROOT)}:{line} {name} is {length} lines"
                for path in files for name, line, length in function_lengths(path) if length > LONGEST_FUNCTION]
    assert not too_long, "split these into functions that fit on a screen:\n" + "\n".join(too_long)


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST_FUNCTION))
    source = tmp_path / "long.py"
    source.write_text(f"@staticmethod\ndef long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert list(function_lengths(source)) == [("long", 2, LONGEST_FUNCTION + 1), ("short", 65, 2)]
