"""Real ``locoswarm run`` processes on 127.0.0.1, each in its own session, always killed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from locoswarm.node import processes as procs
from locoswarm.sim.replay import round_events

QUICK = [
    "--host",
    "127.0.0.1",
    "--metrics-port",
    "0",
    "--threads",
    "1",
    "--max-bytes",
    "200000",
    "--inner-steps",
    "20",
    "--log-every",
    "1",
    "--match-deadline",
    "3",
    "--seed",
    "0",
]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path

    def info(self, timeout_s: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready.exists() and self.ready.read_text().strip():
                return dict(json.loads(self.ready.read_text()))
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout_s}s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rounds(self) -> list[tuple[int, str, float]]:
        """(round, "exchanged" or "solo", train loss) per finished round, from the node's
        machine-readable round events."""
        return [
            (int(e["round"]), "exchanged" if e["outcome"] == "exchanged" else "solo", e["loss"])
            for e in round_events(self.text())
        ]

    def wait_for(self, pattern: str, timeout_s: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited before {pattern!r}:\n{self.text()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout_s}s:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)


class Nodes:
    """Starts nodes; on teardown kills each one's whole process group and checks for orphans."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []

    def start(self, *args: str, name: str | None = None) -> Node:
        name = name or f"node{len(self.nodes)}"
        log, ready = self.root / f"{name}.log", self.root / f"{name}.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "locoswarm", "run", *QUICK, "--ready-file", str(ready), *args]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, proc, log, ready)
        self.nodes.append(node)
        return node

    def join_address(self, node: Node) -> str:
        maddrs = node.info()["maddrs"]
        assert isinstance(maddrs, list)
        return str(maddrs[0])

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
        # Each node runs in its own session: its DHT process and p2pd are in its process group.
        groups = (
            set().union(*(procs.in_group(n.proc.pid) for n in self.nodes)) if self.nodes else set()
        )
        leftover = procs.wait_gone(groups)
        assert leftover == set(), f"processes left behind by the nodes: {leftover}"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    swarm = Nodes(tmp_path)
    try:
        yield swarm
    finally:
        swarm.close()
