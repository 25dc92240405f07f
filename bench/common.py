"""Small pieces the benchmarks share: versions, JSON-safe numbers, the code's source, node flags."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import math
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_node(
    args: list[str], *, log: Path, ready: Path, join: str | None, cwd: Path
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """``python -m locoswarm run ARGS --ready-file READY [--join JOIN]`` in its own session (so
    its whole process group can be killed), output to ``log``; returns the process and command."""
    ready.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "locoswarm",
        "run",
        *args,
        "--ready-file",
        str(ready),
        *(["--join", join] if join else []),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, cmd


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


ROOT = Path(__file__).resolve().parents[1]


def source(subdir: str, label: str) -> dict[str, Any]:
    """Where the benchmarked code comes from: the tree, its git commit, and local changes under
    ``subdir`` (keys ``{label}_changes`` and ``{label}_diff_sha256``)."""
    out: dict[str, Any] = {"tree": str(ROOT), "git_head": None, f"{label}_changes": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            out["git_head"] = head.stdout.strip()
            changes = subprocess.run(
                ["git", "status", "--porcelain", "--", subdir],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            )
            out[f"{label}_changes"] = changes.stdout.split("\n")[:-1]
            diff = subprocess.run(
                ["git", "diff", "HEAD", "--", subdir], cwd=ROOT, capture_output=True, timeout=30
            )
            out[f"{label}_diff_sha256"] = hashlib.sha256(diff.stdout).hexdigest()[:16]
    return out


def print_checks(checks: dict[str, bool | None], notes: dict[str, str]) -> None:
    """One line per target check on stderr: ``[ok]``, ``[MISSED]`` or ``[n/a]``, with its note."""
    for name, ok in checks.items():
        tag = "n/a" if ok is None else ("ok" if ok else "MISSED")
        note = notes.get(name)
        print(f"  [{tag}] {name}{f' ({note})' if note else ''}", file=sys.stderr)
