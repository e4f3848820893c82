"""The READMEs talk to the reader: results, what they mean and how to reproduce them, never the process behind them."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# the chapters' READMEs; a hidden folder's (pytest's own .pytest_cache/README.md) is no chapter
READMES = sorted([REPO_ROOT / "README.md",
                  *(path for path in REPO_ROOT.glob("*/README.md") if not path.parent.name.startswith("."))])

# Wording that belongs to how the work was organised, not to the chapter: issues and their targets or floors,
# machine scheduling, sessions, and stories of how the text came about.
PROCESS_WORDING = [
    r"\bissues?\b",
    r"\btargets? (check|holds?|met|of the)\b",
    r"\b(MFU|KV[- ]cache|speed|time|quality) targets?\b",
    r"\bfloors?\b",
    r"\bCPU[- ]slots?\b",
    r"\bqueue[ds]?\b",
    r"\bsessions?\b",
    r"\bdid not at first\b",
    r"\bthe brief\b",
]


@pytest.mark.parametrize("readme", READMES, ids=[str(r.relative_to(REPO_ROOT)) for r in READMES])
def test_readme_speaks_to_the_reader(readme):
    found = []
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), start=1):
        for pattern in PROCESS_WORDING:
            match = re.search(pattern, line, flags=re.IGNORECASE)
            if match:
                found.append(f"{readme.relative_to(REPO_ROOT)}:{number}: {match.group(0)!r} in: {line.strip()[:100]}")
    assert not found, "process wording in a README:\n" + "\n".join(found)


def test_the_wording_check_can_fail(tmp_path):
    sample = "The issue's target (>= 3x) holds: 3.2x, measured through the CPU-slot queue."
    assert any(re.search(pattern, sample, flags=re.IGNORECASE) for pattern in PROCESS_WORDING)


@pytest.mark.parametrize("readme", READMES, ids=[str(r.relative_to(REPO_ROOT)) for r in READMES])
def test_readme_has_no_control_characters(readme):
    # a LaTeX "\frac" or "\tag" written through an unescaped string turns into a form feed or a tab plus "rac"/"ag";
    # tabs are refused too (none of the READMEs needs one)
    # (split on "\n" alone: str.splitlines would itself break lines at a form feed and hide it)
    found = [f"{readme.relative_to(REPO_ROOT)}:{number}: {line.strip()[:80]!r}"
             for number, line in enumerate(readme.read_text(encoding="utf-8").split("\n"), start=1)
             if re.search(r"[\x00-\x09\x0b-\x1f]", line)]
    assert not found, "control characters in a README:\n" + "\n".join(found)
