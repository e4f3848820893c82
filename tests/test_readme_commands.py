"""Every command a README shows still parses with its script's own argument parser.

Commands are taken from fenced code blocks and from table cells in backticks: `python <chapter>/<script>.py ...`,
`python -m <package>[.<module>] ...` and `make <target>`. Each script runs in this process up to its argument
parsing, which is then stopped, so no command does any work; a flag that no longer exists, or a value the parser
refuses, fails the test with the README and the command named.
"""

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# the chapters' READMEs; a hidden folder's (pytest's own .pytest_cache/README.md) is no chapter
READMES = sorted([REPO_ROOT / "README.md",
                  *(path for path in REPO_ROOT.glob("*/README.md") if not path.parent.name.startswith("."))])
PYTHON_COMMAND = re.compile(r"(?:^|[\s`(])((?:\S+/)?python3?\s+(?:-m\s+[\w.]+|[\w/]+\.py)[^`\n|#]*)")
MAKE_COMMAND = re.compile(r"^((?:[A-Z_]+=\S+\s+)*make(?:\s+[\w=\"-][^`\n|#]*)?)$")


class ParsedArguments(BaseException):
    """Raised once a script's parser has accepted its arguments: nothing after parsing runs."""


def readme_commands(readme: Path) -> list[str]:
    """Commands in fenced code blocks and in backticks, with line continuations joined and comments cut."""
    text = readme.read_text(encoding="utf-8")
    chunks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    chunks += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for chunk in chunks:
        chunk = chunk.replace("\\\n", " ")
        for line in chunk.splitlines():
            line = line.split(" #")[0].strip()
            commands += [match.group(1).strip().rstrip(")") for match in PYTHON_COMMAND.finditer(" " + line)]
            commands += [match.group(1).strip() for match in MAKE_COMMAND.finditer(line)]
    return [expanded for command in commands for expanded in expand_braces(command)]


def expand_braces(command: str) -> list[str]:
    """`--impl {handwritten,torch}` stands for one command per choice, as in the shell."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", command)
    if match is None:
        return [command]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand_braces(command[: match.start()] + choice + command[match.end():])]


def split_command(command: str) -> tuple[str, list[str]] | None:
    """(script path or module, arguments) for a python command; None for one that is not ours to parse."""
    words = shlex.split(command)
    while words and ("=" in words[0] and not words[0].startswith("-")):  # leading VAR=value assignments
        words = words[1:]
    if not words or not Path(words[0]).name.startswith("python"):
        return None
    words = words[1:]
    if words[:1] == ["-m"]:
        return words[1], words[2:]
    if words and words[0].endswith(".py") and (REPO_ROOT / words[0]).is_file():
        return words[0], words[1:]
    return None


def parse_only(target: str, arguments: list[str], monkeypatch) -> None:
    """Run the script or module until its parser has parsed `arguments`, then stop it."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a refused argument exits here, as it would for the reader
        raise ParsedArguments

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [target, *arguments])
    monkeypatch.chdir(REPO_ROOT)
    try:
        if target.endswith(".py"):
            monkeypatch.syspath_prepend(str(REPO_ROOT / Path(target).parent))
            runpy.run_path(str(REPO_ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except ParsedArguments:
        return
    except SystemExit as exit_:
        if exit_.code == 0 and {"-h", "--help"} & set(arguments):
            return
        raise AssertionError(f"the parser refused it (exit {exit_.code})") from None
    raise AssertionError("the script finished without parsing any arguments")


CASES = [(readme, command) for readme in READMES for command in readme_commands(readme)]


def test_the_readmes_show_commands():
    assert len(CASES) > 30, "the command finder no longer sees the READMEs' commands"
    assert any(command.startswith("make") for _, command in CASES)


@pytest.mark.parametrize(
    ("readme", "command"), CASES, ids=[f"{r.relative_to(REPO_ROOT)}:{c[:60]}" for r, c in CASES]
)
def test_readme_command_parses(readme, command, monkeypatch, capsys):
    if command.startswith("make") or re.match(r"[A-Z_]+=\S+\s+make", command):
        words = shlex.split(command)
        targets = [word for word in words[words.index("make") + 1 :] if "=" not in word and not word.startswith("-")]
        result = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), *targets], capture_output=True, text=True)
        assert "No rule to make target" not in result.stderr, f"{readme.name}: `{command}`: {result.stderr.strip()}"
        return
    split = split_command(command)
    if split is None:
        pytest.skip(f"not a command of this repository: {command}")
    target, arguments = split
    try:
        parse_only(target, arguments, monkeypatch)
    except AssertionError as error:
        message = capsys.readouterr().err.strip().splitlines()[-1:] or [""]
        raise AssertionError(f"{readme.relative_to(REPO_ROOT)}: `{command}`: {error}: {message[0]}") from None
