"""Run the fault suite and write docs/RELIABILITY.md from what it observed (and the soak's JSON).

Usage: python -m tests.faults.report [--out docs/RELIABILITY.md] [--soak bench/results/soak.json]
                                     [-k EXPRESSION]

Runs ``python -m pytest tests/faults -q`` with ``FAULTS_RELIABILITY_OUT`` set to a temporary
file (each fault test appends its row there: fault, how it was injected, what was observed) and
with this module loaded as a pytest plugin, which ties the rows a test appended to that test and
notes its outcome (a failure in setup or teardown, e.g. processes left behind, counts as one),
and keeps that variable away from the nodes (see below). A test that fails before it records its
row gets a row that says so, with the failure's message.
Exits with pytest's status; the document is written either way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "RELIABILITY.md"
SOAK = ROOT / "bench" / "results" / "soak.json"
ROWS_ENV = "FAULTS_RELIABILITY_OUT"
OUTCOMES_ENV = "FAULTS_REPORT_OUTCOMES"  # not LOCOSWARM_*: the nodes would read it
SUITE = "tests/faults"
SOAK_COMMAND = "python -m bench.soak --minutes 10 --json bench/results/soak.json"
REPORT_COMMAND = "python -m tests.faults.report"

# -- the pytest plugin (``-p tests.faults.report``) --------------------------------------------
#
# The plugin keeps FAULTS_RELIABILITY_OUT out of the environment the test nodes inherit and sets
# it only while a test's ``record()`` runs, so each row is tied to the test that wrote it.

_rows_path: str | None = None
_started: dict[str, int] = {}
_outcomes: dict[str, dict[str, Any]] = {}


def _row_count() -> int:
    if not _rows_path or not Path(_rows_path).exists():
        return 0
    return len(Path(_rows_path).read_text().splitlines())


def _with_rows_env(original: Any) -> Any:
    def record(*args: Any, **kwargs: Any) -> Any:
        assert _rows_path is not None
        os.environ[ROWS_ENV] = _rows_path
        try:
            return original(*args, **kwargs)
        finally:
            os.environ.pop(ROWS_ENV, None)

    record.wrapped = True  # type: ignore[attr-defined]
    return record


def pytest_configure(config: Any) -> None:
    global _rows_path
    _rows_path = os.environ.pop(ROWS_ENV, None)


def pytest_runtest_setup(item: Any) -> None:
    module = getattr(item, "module", None)
    original = getattr(module, "record", None)
    if _rows_path and callable(original) and not getattr(original, "wrapped", False):
        module.record = _with_rows_env(original)  # type: ignore[union-attr]
    _started[item.nodeid] = _row_count()


def pytest_runtest_logreport(report: Any) -> None:
    if not os.environ.get(OUTCOMES_ENV):
        return
    seen = _outcomes.setdefault(
        report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "seconds": 0.0}
    )
    seen["seconds"] += float(report.duration)
    if report.failed and seen["outcome"] == "passed":
        seen["outcome"] = "failed" if report.when == "call" else f"error in {report.when}"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(report.longrepr).strip().splitlines()[-1]
        message = " ".join(str(message).split())
        seen["message"] = message if len(message) <= 300 else message[:297] + "..."
    elif report.skipped and seen["outcome"] == "passed":
        seen["outcome"] = "skipped"
    if report.when == "teardown":
        rows = Path(_rows_path).read_text().splitlines() if _rows_path and _row_count() else []
        seen["rows"] = [json.loads(r) for r in rows[_started.get(report.nodeid, 0) :] if r]
        with open(os.environ[OUTCOMES_ENV], "a") as f:
            f.write(json.dumps(_outcomes.pop(report.nodeid)) + "\n")


# -- running the suite and writing the document -------------------------------------------------


def run_suite(k: str | None) -> tuple[int, list[dict[str, Any]], float, str]:
    """(pytest's status, one outcome per test, seconds, pytest's last lines)."""
    with tempfile.TemporaryDirectory(prefix="locoswarm-faults-") as tmp:
        rows, outcomes = Path(tmp) / "rows.jsonl", Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, ROWS_ENV: str(rows), OUTCOMES_ENV: str(outcomes)}
        # One process: the plugin ties rows to tests in this process (xdist workers would not).
        cmd = [sys.executable, "-m", "pytest", SUITE, "-q", "-n", "0", "-p", "tests.faults.report"]
        cmd += ["-k", k] if k else []
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        found = (
            [json.loads(line) for line in outcomes.read_text().splitlines() if line]
            if outcomes.exists()
            else []
        )
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return done.returncode, found, seconds, tail


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _fmt(value: Any, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"


def fault_table(outcomes: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| Fault | How it was injected | What happened | Test | Result |",
        "|---|---|---|---|---|",
    ]
    for test in outcomes:
        name = test["nodeid"].rsplit("::", 1)[-1]
        result = f"{test['outcome']} ({test['seconds']:.0f} s)"
        if test["outcome"] != "passed":
            result = f"**{test['outcome'].upper()}** ({test['seconds']:.0f} s)"
        rows = test.get("rows") or [
            {
                "fault": name.removeprefix("test_").replace("_", " "),
                "injected": "see the test",
                "observed": "",
            }
        ]
        for row in rows:
            observed = row["observed"]
            if test["outcome"] != "passed":
                message = test.get("message", "")
                observed = f"{test['outcome'].upper()}: {message}" + (
                    f" (recorded before: {observed})" if observed else ""
                )
            lines.append(
                f"| {_cell(row['fault'])} | {_cell(row['injected'])} | {_cell(observed)} "
                f"| `{name}` | {result} |"
            )
    return lines


def soak_section(path: Path) -> list[str]:
    if not path.exists():
        return [f"No soak results yet ({path} is missing): run `{SOAK_COMMAND}`."]
    data = json.loads(path.read_text())
    h, s = data.get("header", {}), data.get("summary", {})
    lines = [
        f"Command: `{h.get('command', SOAK_COMMAND)}` ({h.get('date', '?')}, "
        f"{h.get('cpu_count', '?')} CPUs). {h.get('nodes')} real nodes on 127.0.0.1; every "
        f"{_fmt(h.get('kill_every_s'), 'g')} s {h.get('kill', 'a random node is killed')}.",
        "",
    ]
    if data.get("error"):
        lines += [f"**The soak run did not complete: {_cell(data['error'])}**", ""]
    lines += ["| Check | Result |", "|---|---|"]
    for name, ok in data.get("checks", {}).items():
        mark = {True: "holds", False: "**does not hold**", None: "not determined"}[ok]
        lines.append(f"| {_cell(name)} | {mark} |")
    ex = s.get("exchanges", {})
    quarters = ", ".join(_fmt(q, ".3f") for q in s.get("loss_quarters", []))
    recovery = s.get("recovery_rounds", [])
    counts: dict[str, int] = {}
    for r in recovery:
        key = "never" if r is None else str(r)
        counts[key] = counts.get(key, 0) + 1
    left = data.get("leftover", {})

    def pct(value: Any) -> str:
        return _fmt(value, "+.1%")

    lines += [
        "",
        f"- run: {_fmt(s.get('duration_s'), '.0f', ' s')} after start-up "
        f"({_fmt(h.get('startup_s'), '.0f', ' s')}), {s.get('kills')} kills and restarts, "
        f"{s.get('unexpected_exits')} unexpected exits",
        f"- rounds: {s.get('rounds')}: {ex.get('ok')} exchanged, {ex.get('failed')} failed "
        f"(solo step), {ex.get('solo')} solo (no partner); exchanged fraction "
        f"{_fmt(s.get('ok_fraction'), '.0%')}",
        f"- mean train loss per quarter of the run: {quarters}",
        f"- node process VmRSS growth after {_fmt(h.get('warmup_s'), '.0f')} s of warm-up: max "
        f"{pct(s.get('rss_growth_max'))}, median {pct(s.get('rss_growth_median'))} over "
        f"{s.get('rss_growth_measured_incarnations')} incarnations that lived long enough; "
        f"whole process group (DHT process, p2pd) max {pct(s.get('group_rss_growth_max'))}",
        f"- open file descriptors: at most {s.get('fds_max')} in a node process; growth after "
        f"warm-up max {pct(s.get('fd_growth_max'))}",
        "- rounds after a restart up to its first exchange: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no kills")
        + f"; median {_fmt(s.get('recovery_seconds_median'), '.0f', ' s')} from restart to it",
        f"- leftover processes: {s.get('leftover_processes')} (after a SIGTERM stop: "
        f"{len(left.get('after_graceful_stop', []))}; p2pd processes seen: "
        f"{left.get('p2pd_seen')})",
    ]
    return lines


def document(
    status: int,
    outcomes: list[dict[str, Any]],
    seconds: float,
    tail: str,
    soak: Path,
    k: str | None = None,
) -> str:
    passed = sum(1 for t in outcomes if t["outcome"] == "passed")
    lines = [
        "# Reliability",
        "",
        f"Generated by `{REPORT_COMMAND}` on "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
        f"({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {_version('torch')}, hivemind "
        f"{_version('hivemind')}, grpcio {_version('grpcio')}). Do not edit by hand.",
        "",
        "## Faults tried",
        "",
        f"`python -m pytest {SUITE} -q{f' -k {k!r}' if k else ''}`: real `locoswarm run` "
        "processes on 127.0.0.1 under "
        f"injected faults. {passed} of {len(outcomes)} tests passed "
        f"(pytest exit status {status}, {seconds / 60:.1f} min).",
        "",
        *fault_table(outcomes),
    ]
    if status != 0 or not outcomes:
        lines += ["", "pytest's last lines:", "", "```", tail, "```"]
    lines += [
        "",
        "## Soak under churn",
        "",
        *soak_section(soak),
        "",
        "## Regenerating this document",
        "",
        "```",
        f"{SOAK_COMMAND}   # about 12 min: writes bench/results/soak.json and soak.png",
        f"{REPORT_COMMAND}   # runs {SUITE} (about 5 min), reads the soak JSON, writes this file",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--soak", type=Path, default=SOAK)
    p.add_argument("-k", default=None, help="only the fault tests matching (pytest -k)")
    a = p.parse_args(argv)
    status, outcomes, seconds, tail = run_suite(a.k)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(document(status, outcomes, seconds, tail, a.soak.resolve(), a.k))
    print(f"{a.out}: {len(outcomes)} tests, pytest exit status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
