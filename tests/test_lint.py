"""The project's own checks run as tests, so CI and a local run agree: ruff, mypy, import-linter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    path = str(found) if found.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the project with its [test] extra")
    return path


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "import-linter"],
)
def test_linters_are_clean(cmd: list[str]) -> None:
    proc = subprocess.run(
        [_tool(cmd[0]), *cmd[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    proc = subprocess.run(
        [_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=290, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
