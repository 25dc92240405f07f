"""Two real nodes on 127.0.0.1 scraped by a real Prometheus that runs the shipped config (node
targets and intervals swapped in): every dashboard query returns data, the alert rules
evaluate, and the node's /metrics passes promtool."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locoswarm.node import processes as procs
from tests.deploy import tools
from tests.deploy.tools import PROMETHEUS_DIR, PrometheusServer, PrometheusTools, promtool
from tests.integration.conftest import Node, Nodes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EXCHANGES = 3  # rounds with an exchange each node must have logged before the queries


class Swarm(Nodes):
    """``Nodes`` whose teardown kills and checks only its nodes' own process groups (each node's
    DHT process and p2pd are in its group); other tests may run p2pd daemons meanwhile."""

    def close(self) -> None:
        leftover: set[int] = set()
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
            leftover |= procs.wait_gone(procs.in_group(node.proc.pid))
        assert leftover == set(), f"processes of the nodes left behind: {leftover}"


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    nodes = Swarm(tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def prometheus(prometheus_tools: PrometheusTools, tmp_path: Path) -> Iterator[PrometheusServer]:
    server = PrometheusServer(prometheus_tools, tmp_path / "prometheus")
    server.workdir.mkdir()
    try:
        yield server
    finally:
        server.close()


def _target(node: Node) -> str:
    url = urllib.parse.urlsplit(str(node.info()["metrics"]))
    return f"{url.hostname}:{url.port}"


def _exchanged(node: Node) -> int:
    return sum(1 for _, how, _ in node.rounds() if how == "exchanged")


def _wait(what: str, check: Any, timeout_s: float, details: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{details()}")
        time.sleep(0.5)


def _dashboard_failures(
    prometheus: PrometheusServer, dashboard: dict[str, Any], instances: list[str]
) -> list[str]:
    """Queries that return no data, for each node alone and for all of them (Grafana's All)."""
    failures = []
    selections = [tools.grafana_regex_value(i) for i in instances] + [".*"]
    for selected in selections:
        for q in tools.dashboard_queries(dashboard):
            expr = tools.substitute(q.expr, selected)
            result = prometheus.query(expr)
            if not tools.has_data(result):
                failures.append(f"{q.where} with instance={selected}: {expr} -> {result}")
    for name, query in tools.variable_queries(dashboard):
        expr, label = tools.label_values_as_promql(query)
        values = {r["metric"].get(label) for r in prometheus.query(expr)}
        if not set(instances) <= values:
            failures.append(f"variable {name}: {expr} -> {sorted(map(str, values))}")
    return failures


def test_dashboard_queries_return_data_from_a_real_swarm(
    swarm: Swarm,
    prometheus: PrometheusServer,
    prometheus_tools: PrometheusTools,
) -> None:
    first = swarm.start()
    second = swarm.start("--join", swarm.join_address(first))
    nodes = [first, second]
    instances = [_target(n) for n in nodes]

    deploy_config = tools.load_yaml(tools.PROMETHEUS_CONFIG)
    config_dir = prometheus.workdir / "config"
    shutil.copytree(PROMETHEUS_DIR, config_dir)  # alerts.yml and targets/ next to the config

    def make_config(listen: str) -> Path:
        config = tools.config_for_nodes(deploy_config, instances, listen)
        path = config_dir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))
        return path

    path = make_config("127.0.0.1:9090")
    promtool(prometheus_tools, "check", "config", str(path))
    prometheus.start(make_config)

    for node in nodes:
        _wait(
            f"{node.name}: {EXCHANGES} rounds with an exchange",
            lambda n=node: _exchanged(n) >= EXCHANGES or n.proc.poll() is not None,
            180,
            node.text,
        )
        assert node.proc.poll() is None, node.text()

    def scraped() -> bool:
        up = prometheus.query(f'up{{job="{tools.NODE_JOB}"}} == 1')
        return {r["metric"]["instance"] for r in up} == set(instances)

    _wait("both nodes scraped", scraped, 60, lambda: prometheus.api("targets"))

    dashboard = tools.load_dashboard()
    failures: list[str] = []

    def all_have_data() -> bool:
        failures[:] = _dashboard_failures(prometheus, dashboard, instances)
        return not failures

    _wait("every dashboard query has data", all_have_data, 60, lambda: "\n".join(failures))

    # The alert rules load and evaluate without errors against real series.
    rules = tools.load_yaml(PROMETHEUS_DIR / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            prometheus.query(rule["expr"])  # raises on an error

    def rules_evaluated() -> bool:
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(loaded) == sum(len(g["rules"]) for g in rules["groups"]) and all(
            r["health"] == "ok" for r in loaded
        )

    _wait("alert rules evaluated", rules_evaluated, 30, lambda: prometheus.api("rules"))
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert not [a for a in firing if a["labels"]["alertname"] == "LocoswarmLossNotFinite"]

    # What a running node serves passes promtool's lint.
    with urllib.request.urlopen(str(second.info()["metrics"]), timeout=10) as reply:
        text = reply.read().decode()
    promtool(prometheus_tools, "check", "metrics", stdin=text)
