"""The style rules of pyproject.toml's [tool.ruff] hold for every file in the repository.

Ruff is in the test extra (one minor release, so that a new rule in a later release does not
turn the suite red on its own), so this check runs wherever the tests do instead of relying on
someone remembering to run it by hand.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
