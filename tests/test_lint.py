"""The linter and the type checker are part of the suite."""

from __future__ import annotations

import subprocess

from tests.harness import ROOT, VENV_BIN


def test_ruff_is_clean() -> None:
    result = subprocess.run([str(VENV_BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = subprocess.run([str(VENV_BIN / "mypy"), "agent", "server", "common"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
