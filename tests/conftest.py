"""Shared test set-up: seeding, the data mirror, and a helper to run a chapter's CLI."""

import os
import random
import subprocess
import sys
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
