"""promtool on the shipped Prometheus files, the dashboard's queries and the node's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from locoswarm.node.metrics import NodeMetrics
from tests.deploy import tools
from tests.deploy.tools import PROMETHEUS_CONFIG, PROMETHEUS_DIR, PrometheusTools, promtool

# The first test to use promtool may install it (apt-get).
pytestmark = pytest.mark.timeout(900)


def test_prometheus_config_is_valid(prometheus_tools: PrometheusTools) -> None:
    out = promtool(prometheus_tools, "check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in out, out
    assert "rule files found" in out, out


def test_agent_config_is_valid_for_agent_mode(prometheus_tools: PrometheusTools) -> None:
    promtool(prometheus_tools, "check", "config", "--agent", str(PROMETHEUS_DIR / "agent.yml"))


def test_alert_rules_are_valid(prometheus_tools: PrometheusTools) -> None:
    out = promtool(prometheus_tools, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert "SUCCESS" in out, out


def test_alert_rules_unit_tests_pass(prometheus_tools: PrometheusTools) -> None:
    out = promtool(prometheus_tools, "test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out, out


def test_every_alert_has_a_unit_test() -> None:
    rules = tools.load_yaml(PROMETHEUS_DIR / "alerts.yml")
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = tools.load_yaml(PROMETHEUS_DIR / "alerts.test.yml")
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts never seen firing in alerts.test.yml: {alerts - tested}"


def test_dashboard_queries_parse(prometheus_tools: PrometheusTools, tmp_path: Path) -> None:
    """Each panel query (Grafana variables filled in) as a recording rule: promtool parses it."""
    dashboard = tools.load_dashboard()
    exprs = [tools.substitute(q.expr, ".*") for q in tools.dashboard_queries(dashboard)]
    exprs += [tools.label_values_as_promql(q)[0] for _, q in tools.variable_queries(dashboard)]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool(prometheus_tools, "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out, out


def test_node_metrics_pass_promtool_lint(prometheus_tools: PrometheusTools) -> None:
    """What a node serves at /metrics (the same registry, filled in), linted by promtool."""
    metrics = NodeMetrics()
    metrics.bytes_sent.labels(kind="exchange").inc(1e6)
    metrics.bytes_received.labels(kind="state").inc(2e6)
    metrics.exchange_seconds.labels(result="ok").observe(0.7)
    metrics.exchanges.labels(result="ok").inc()
    metrics.loss.set(2.5)
    text = generate_latest(metrics.registry).decode()
    promtool(prometheus_tools, "check", "metrics", stdin=text)
