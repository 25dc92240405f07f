"""Helpers for the deploy/ checks: paths, file parsers, Prometheus binaries and a test server."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from locoswarm.node import processes as procs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
JOIN_SCRIPT = DEPLOY / "docker" / "locoswarm-join.sh"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "locoswarm.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"
UNIT = DEPLOY / "systemd" / "locoswarm.service"
NODE_JOB = "locoswarm"
SELF_JOB = "prometheus"

# What Grafana would put in place of its variables when the tests evaluate panel queries.
RATE_INTERVAL = "30s"


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose and Prometheus files")
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


# -- Dockerfile and .dockerignore ---------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    comments: tuple[str, ...]
    """The comment lines right above the instruction."""

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form: {self.args}"
        return [str(v) for v in value]


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined (comment lines inside them dropped)."""
    out: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if not pending:
                comments.append(line.lstrip("#").strip())
            continue
        if not line:
            if not pending:
                comments = []
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        text = " ".join([*pending, line])
        pending = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), tuple(comments)))
        comments = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def docker_env(instructions: list[Instruction]) -> dict[str, str]:
    """ENV key=value pairs (the forms this project uses)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {ins.args!r}: use KEY=VALUE"
                env[key] = value
    return env


def copy_sources(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD, flags such as --chmod left out."""
    out: list[tuple[str, str]] = []
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
            out.extend((src, parts[-1]) for src in parts[:-1])
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(relative: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    """Whether ``relative`` (a path in the build context) is left out of the context: the last
    matching pattern decides; a pattern that matches a parent directory matches its files."""
    rules = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((keep, _pattern_regex(os.path.normpath(pattern))))
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for keep, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not keep
    return excluded


# -- systemd --------------------------------------------------------------------------------------


def unit_file(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(text: str) -> float:
    """systemd/compose durations: 120, 120s, 2m, 1m30s."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total = 0.0
    found = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert found, text
    assert "".join(a + u for a, u in found) == text.replace(" ", ""), text
    for amount, unit in found:
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# -- dashboard expressions ------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    where: str
    expr: str


def dashboard_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every PromQL expression of every panel (rows' nested panels included)."""
    found: list[PanelQuery] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}"
                    found.append(PanelQuery(where, str(target["expr"])))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of the query variables, as Grafana stores them."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            out.append((str(var["name"]), str(query)))
    return out


def label_values_as_promql(query: str) -> tuple[str, str]:
    """``label_values(metric, label)`` -> (PromQL giving that label's values, label)."""
    found = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", query)
    assert found, f"variable query {query!r} is not label_values(metric, label)"
    selector, label = found.groups()
    return f"group by ({label}) ({selector})", label


def substitute(expr: str, instance: str, rate_interval: str = RATE_INTERVAL) -> str:
    """Grafana's variables: ``$instance`` is a regex (escape a real value yourself)."""
    for name in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}"):
        expr = expr.replace(name, rate_interval)
    expr = expr.replace("$__range", "15m").replace("${instance}", instance)
    return expr.replace("$instance", instance)


def grafana_regex_value(value: str) -> str:
    """A variable value as Grafana's Prometheus datasource puts it into ``=~"..."``."""
    escaped = re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", value)
    return escaped.replace("\\", "\\\\")


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(locoswarm_[a-z0-9_]+|up)\b(?!\s*\()", expr))


# -- Prometheus binaries ------------------------------------------------------------------------


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _stop_packaged_service(before: set[int]) -> None:
    """The Debian package may start its own service: stop it; kill what the install started."""
    started = procs.named("prometheus") - before
    if not started:
        return
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        _run(["systemctl", "stop", "prometheus.service"], timeout=60)
    elif shutil.which("service"):
        _run(["service", "prometheus", "stop"], timeout=60)
    for pid in procs.named("prometheus") & started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in procs.wait_gone(started, timeout_s=15):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ensure_prometheus() -> PrometheusTools:
    """Debian's prometheus package (prometheus + promtool), installed when missing."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return PrometheusTools(prometheus, promtool)
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip(
            "prometheus/promtool are missing and apt-get cannot install them here (needs "
            "root and apt-get): apt-get install prometheus"
        )
    before = procs.named("prometheus")
    install = [
        apt,
        "-o",
        "DPkg::Lock::Timeout=180",
        "install",
        "-y",
        "--no-install-recommends",
        "prometheus",
    ]
    done = _run(install, timeout=900)
    if done.returncode != 0:  # stale or missing package lists
        _run([apt, "-o", "DPkg::Lock::Timeout=180", "update"], timeout=900)
        done = _run(install, timeout=900)
    _stop_packaged_service(before)
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if done.returncode != 0 or not (prometheus and promtool):
        pytest.skip(
            f"could not install Debian's prometheus package (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return PrometheusTools(prometheus, promtool)


def promtool(tools: PrometheusTools, *args: str, stdin: str | None = None, cwd: Path = ROOT) -> str:
    """Run promtool; fail the test with its output unless it exits 0."""
    done = subprocess.run(
        [tools.promtool, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


# -- a Prometheus server for one test ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_for_nodes(deploy_config: dict[str, Any], node_targets: list[str], listen: str) -> Any:
    """The deploy config with its node targets replaced by ``node_targets``, Prometheus's own
    target by ``listen`` and 1 s intervals; everything else stays as shipped."""
    config = json.loads(json.dumps(deploy_config))  # a deep copy
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    if "scrape_timeout" in config["global"]:
        config["global"]["scrape_timeout"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert NODE_JOB in jobs, f"the deploy config has no {NODE_JOB!r} job"
    for job in jobs.values():
        for key in ("scrape_interval", "scrape_timeout"):
            if key in job:
                job[key] = "1s"
    jobs[NODE_JOB]["static_configs"] = [{"targets": node_targets}]
    if SELF_JOB in jobs:
        jobs[SELF_JOB]["static_configs"] = [{"targets": [listen]}]
    return config


class PrometheusServer:
    """``prometheus`` in its own session with its own storage; always killed at ``close``."""

    def __init__(self, tools: PrometheusTools, workdir: Path) -> None:
        self.tools = tools
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = workdir / "prometheus.log"

    def start(self, make_config: Any, attempts: int = 3) -> None:
        """``make_config(listen_address) -> path of the config file``; retries on a port clash."""
        for _ in range(attempts):
            listen = f"127.0.0.1:{free_port()}"
            config = make_config(listen)
            storage = self.workdir / "tsdb"
            shutil.rmtree(storage, ignore_errors=True)
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [
                        self.tools.prometheus,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={storage}",
                        f"--web.listen-address={listen}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.url = f"http://{listen}"
            if self._wait_ready(60):
                return
            self.close()
        raise AssertionError(f"prometheus did not start:\n{self.log.read_text(errors='replace')}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply,
            ):
                if reply.status == 200:
                    return True
            time.sleep(0.2)
        return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.loads(exc.read())
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        left = procs.wait_gone(procs.in_group(self.proc.pid))
        self.proc = None
        assert not left, f"prometheus left processes behind: {left}"


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a number (NaN from 0/0 or an empty histogram is no data)."""
    return any(not math.isnan(float(sample["value"][1])) for sample in result)
