"""The repository stays clean under the ruff configuration in pyproject.toml."""

import subprocess
import sys

from conftest import REPO


def test_ruff_check_is_clean():
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "."]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"
