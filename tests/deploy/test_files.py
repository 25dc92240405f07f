"""What can be checked of deploy/ without a container engine: the files parse, images are pinned,
every referenced file exists, and the settings agree with each other and with the node."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from locoswarm.node.cli import build_parser
from locoswarm.node.config import NodeConfig
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.run import config_from_args
from locoswarm.peers.membership import check_join_addresses
from tests.deploy import tools
from tests.deploy.tools import (
    COMPOSE,
    COMPOSE_GPU,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DEPLOY,
    DOCKERFILE,
    JOIN_SCRIPT,
    PROMETHEUS_CONFIG,
    ROOT,
    Instruction,
)

PEER_ID = "12D3KooWFkJQuGvmedvQYJeG2j5h23QAyTydWcx5txxJddkQXx97"
FAKE_JOIN = f"/ip4/10.0.0.1/tcp/31337/p2p/{PEER_ID}"
GRPC_PORT, DHT_PORT, METRICS_PORT = 50051, 31337, 9310
NODE_SERVICES = ("node1", "node2", "node3")


def _pinned(image: str) -> bool:
    """``repo:tag`` (or a digest) with a tag that is not latest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _node_config(args: list[str], environ: dict[str, str]) -> NodeConfig:
    """The config ``locoswarm run ARGS`` builds with ``environ`` (as in the container)."""
    a = build_parser().parse_args(["run", *args])
    return config_from_args(a, environ)


def _exposed_ports(instructions: list[Instruction]) -> dict[int, tuple[str, ...]]:
    return {
        int(port.split("/")[0]): ins.comments
        for ins in instructions
        if ins.keyword == "EXPOSE"
        for port in ins.args.split()
    }


# -- Dockerfile ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker() -> list[Instruction]:
    return tools.dockerfile()


def test_dockerfile_base_image_is_a_pinned_cuda_pytorch(docker: list[Instruction]) -> None:
    froms = [ins.args.split()[0] for ins in docker if ins.keyword == "FROM"]
    assert len(froms) == 1, froms
    assert froms[0].startswith("pytorch/pytorch:"), froms
    assert _pinned(froms[0]), froms
    assert re.search(r":\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime$", froms[0]), froms


def test_dockerfile_runs_the_node_as_an_unprivileged_user(docker: list[Instruction]) -> None:
    users = [ins.args for ins in docker if ins.keyword == "USER"]
    assert users, "no USER: the node would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, ins in enumerate(docker) if ins.keyword == "USER")
    installs = [i for i, ins in enumerate(docker) if ins.keyword == "RUN" and "pip" in ins.args]
    assert installs
    assert max(installs) < last_user, "pip install should run before USER"
    assert any(ins.keyword == "RUN" and "pip install" in ins.args for ins in docker)


def test_dockerfile_entrypoint_stop_signal_and_volume(docker: list[Instruction]) -> None:
    entry = [ins for ins in docker if ins.keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    assert entry[0].exec_form()[:2] == ["locoswarm", "run"], "exec form keeps the node on SIGTERM"
    assert [ins.args for ins in docker if ins.keyword == "STOPSIGNAL"] == ["SIGTERM"]
    volumes = [v for ins in docker if ins.keyword == "VOLUME" for v in json.loads(ins.args)]
    assert volumes, "no VOLUME for checkpoints"
    env = tools.docker_env(docker)
    for key in ("LOCOSWARM_CHECKPOINT__DIR", "LOCOSWARM_PEERS__IDENTITY_PATH"):
        assert any(PurePosixPath(env[key]).is_relative_to(v) for v in volumes), (key, volumes)


def test_dockerfile_ports_are_exposed_commented_and_used(docker: list[Instruction]) -> None:
    exposed = _exposed_ports(docker)
    assert set(exposed) == {GRPC_PORT, DHT_PORT, METRICS_PORT}, exposed
    for port, word in ((GRPC_PORT, "gRPC"), (DHT_PORT, "DHT"), (METRICS_PORT, "metrics")):
        said = [c for c in exposed[port] if c.startswith(f"{port}/tcp:")]
        assert said, f"say above EXPOSE which port {port} is"
        assert word in said[0], f"say above EXPOSE which port {port} is: {word}"
    entry = next(ins for ins in docker if ins.keyword == "ENTRYPOINT").exec_form()
    config = _node_config(entry[2:], tools.docker_env(docker))
    assert config.protocol.port == GRPC_PORT
    assert config.metrics_port == METRICS_PORT
    assert config.peers.host_maddrs == (f"/ip4/0.0.0.0/tcp/{DHT_PORT}",)
    assert config.protocol.host == "0.0.0.0"
    assert config.metrics_host == "0.0.0.0"


def test_dockerfile_healthcheck_asks_the_node_on_its_grpc_port(docker: list[Instruction]) -> None:
    checks = [ins.args for ins in docker if ins.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    found = re.search(r"CMD (.*)$", checks[0])
    assert found, checks
    command = found.group(1)
    assert command.startswith("locoswarm health "), command
    port = re.search(r"127\.0\.0\.1:(\S+?)\"?\s", command)
    assert port, command
    resolved = re.sub(
        r"\$\{?(\w+)\}?", lambda m: tools.docker_env(docker)[m.group(1)], port.group(1)
    )
    assert resolved == str(GRPC_PORT), command
    start = re.search(r"--start-period=(\S+)", checks[0])
    assert start
    assert tools.seconds(start.group(1)) >= 60, "startup (DHT, late join) takes time"


def test_dockerfile_copies_only_what_exists_and_is_in_the_context(
    docker: list[Instruction],
) -> None:
    copies = tools.copy_sources(docker)
    assert copies
    for src, _dest in copies:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the build context (the repository root)"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not tools.dockerignored(relative), f"{relative} is in .dockerignore"
    sources = {src for src, _ in copies}
    assert {"pyproject.toml", "README.md", "locoswarm"} <= sources
    join = [dest for src, dest in copies if src == JOIN_SCRIPT.relative_to(ROOT).as_posix()]
    assert join == ["/usr/local/bin/locoswarm-join"], copies


def test_dockerignore_leaves_out_local_state() -> None:
    for path in (
        ".venv/bin/python",
        ".ci-venv/lib/x.py",
        ".git/HEAD",
        "bench/results/run.json",
        "locoswarm/__pycache__/x.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/v/x",
        "locoswarm.egg-info/PKG-INFO",
        "out/quick.log",
    ):
        assert tools.dockerignored(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "locoswarm/node/run.py",
        "deploy/docker/Dockerfile",
    ):
        assert not tools.dockerignored(path), path


# -- the joiners' entrypoint ----------------------------------------------------------------------


def _fake_locoswarm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "locoswarm"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\n')
    fake.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "FAKE_ARGS": str(tmp_path / "args")}


def _ready_line(port: int = 4242) -> str:
    maddrs = [f"/ip4/172.18.0.2/tcp/{port}/p2p/{PEER_ID}", f"/ip4/127.0.0.1/tcp/{port}/p2p/x"]
    return json.dumps({"peer_id": PEER_ID, "maddrs": maddrs, "grpc": "node1:50051"}) + "\n"


@pytest.mark.timeout(60)
def test_join_entrypoint_waits_for_the_ready_file_and_joins_through_it(tmp_path: Path) -> None:
    env = _fake_locoswarm(tmp_path)
    ready = tmp_path / "swarm" / "node1.json"
    ready.parent.mkdir()

    def write_later() -> None:
        time.sleep(1.5)
        ready.write_text('{"peer_id": "12D3')  # half written first
        time.sleep(1.5)
        ready.write_text(_ready_line())

    writer = threading.Thread(target=write_later)
    writer.start()
    done = subprocess.run(
        ["sh", str(JOIN_SCRIPT), str(ready), "localhost", "--dht-port", "31337"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    writer.join()
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    join = f"/ip4/127.0.0.1/tcp/4242/p2p/{PEER_ID}"
    assert args == ["run", "--join", join, "--dht-port", "31337"], args
    check_join_addresses((join,))
    config = _node_config(args[1:], {})
    assert config.peers.initial_peers == (join,)


@pytest.mark.timeout(60)
def test_join_entrypoint_gives_up_with_a_message(tmp_path: Path) -> None:
    env = {**_fake_locoswarm(tmp_path), "JOIN_WAIT_S": "1"}
    done = subprocess.run(
        ["sh", str(JOIN_SCRIPT), str(tmp_path / "missing.json"), "localhost"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "no usable ready file" in done.stderr
    assert not (tmp_path / "args").exists()
    usage = subprocess.run(
        ["sh", str(JOIN_SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert usage.returncode == 2
    assert "usage" in usage.stderr


# -- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = tools.load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (a host path relative to deploy/ or a named volume)."""
    out = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), volume
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file the container reads comes from, through the service's bind mounts."""
    target = PurePosixPath(container_path)
    for mount, source in sorted(_mounts(service).items(), key=lambda m: -len(m[0])):
        if target.is_relative_to(mount):
            assert source.startswith("."), f"{container_path} comes from volume {source}"
            return (DEPLOY / source / target.relative_to(mount)).resolve()
    raise AssertionError(f"{container_path} is not mounted into the service")


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(NODE_SERVICES) | {"prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        assert _pinned(service["image"]), f"{name}: {service['image']} is not pinned"
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_compose_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes", {}))
    declared_networks = set(compose.get("networks", {}))
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        for source in _mounts(service).values():
            if source.startswith(("./", "../", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        assert set(service.get("networks", [])) <= declared_networks, name
        assert set(service.get("depends_on", {})) <= set(services), name


def test_compose_nodes_form_one_swarm(compose: dict[str, Any], docker: list[Instruction]) -> None:
    services = compose["services"]
    env = tools.docker_env(docker)
    image_entry = next(ins for ins in docker if ins.keyword == "ENTRYPOINT").exec_form()
    first = services["node1"]
    ready = next(a for a in first["command"] if a.endswith(".json"))
    for name in NODE_SERVICES:
        service = services[name]
        assert service["init"] is True, f"{name}: init reaps the DHT process and p2pd"
        assert service["stop_signal"] == "SIGTERM"
        grace = tools.seconds(service["stop_grace_period"])
        assert grace >= NodeConfig().shutdown_grace_s + 30, f"{name}: stop grace {grace}s"
        entry = service.get("entrypoint", image_entry)
        if entry[0] == "locoswarm-join":
            assert entry[1:] == [ready, "node1"], entry
            assert "node1" in service["depends_on"]
            args = ["--join", FAKE_JOIN, *service["command"]]  # what locoswarm-join adds
        else:
            assert entry[:2] == ["locoswarm", "run"], entry
            args = [*entry[2:], *service["command"]]
        config = _node_config(args, env)
        assert config.announce == f"{name}:{config.protocol.port}", name
        assert config.peers.host_maddrs == (f"/ip4/0.0.0.0/tcp/{DHT_PORT}",), name
        assert (name == "node1") == (not config.peers.initial_peers), name
        assert config.peers.identity_path is not None
        assert config.checkpoint.dir is not None
        data = _mounts(service)
        assert any(PurePosixPath(config.checkpoint.dir).is_relative_to(t) for t in data), name
    assert str(_node_config(first["command"], env).ready_file) == ready
    assert PurePosixPath(ready).parent.as_posix() in _mounts(first)


def test_compose_prometheus_scrapes_the_nodes_with_the_shipped_files(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["prometheus"]
    flags = dict(a.split("=", 1) for a in service["command"] if "=" in a)
    config_path = flags["--config.file"]
    assert _host_path(service, config_path) == PROMETHEUS_CONFIG.resolve()
    config = tools.load_yaml(PROMETHEUS_CONFIG)
    config_dir = PurePosixPath(config_path).parent
    for rule_file in config["rule_files"]:
        host = _host_path(service, str(config_dir / rule_file))
        assert host.is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    node_job = jobs[tools.NODE_JOB]
    targets = [t for sc in node_job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{n}:{METRICS_PORT}" for n in NODE_SERVICES]
    for sd in node_job.get("file_sd_configs", []):
        for pattern in sd["files"]:
            assert _host_path(service, str(config_dir / pattern)).parent.is_dir(), pattern


def test_file_sd_example_is_valid_target_groups() -> None:
    examples = sorted((DEPLOY / "prometheus" / "targets").glob("*.example"))
    assert examples
    for example in examples:
        groups = json.loads(example.read_text())
        assert isinstance(groups, list)
        assert groups
        for group in groups:
            assert set(group) <= {"targets", "labels"}
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in group["targets"])


def test_compose_grafana_is_provisioned_from_files(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    provisioning = _host_path(service, "/etc/grafana/provisioning")
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    datasources = [
        ds
        for file in sorted(DATASOURCES.glob("*.yaml"))
        for ds in tools.load_yaml(file)["datasources"]
    ]
    assert len(datasources) == 1
    ds = datasources[0]
    assert ds["type"] == "prometheus"
    assert ds["uid"]
    url = re.fullmatch(r"http://([\w-]+):(\d+)/?", ds["url"])
    assert url, ds["url"]
    host, port = url.groups()
    assert host in compose["services"]
    assert port == "9090"
    scrape = tools.load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the scrape interval"
    providers = [
        p
        for file in sorted(DASHBOARD_PROVIDERS.glob("*.yaml"))
        for p in tools.load_yaml(file)["providers"]
    ]
    assert providers
    for provider in providers:
        folder = _host_path(service, provider["options"]["path"])
        assert (folder / tools.DASHBOARD.name).is_file(), folder
    home = service["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert _host_path(service, home) == tools.DASHBOARD.resolve()


def test_compose_gpu_override_only_adds_gpus(compose: dict[str, Any]) -> None:
    override = tools.load_yaml(COMPOSE_GPU)
    assert set(override["services"]) == set(NODE_SERVICES)
    for service in override["services"].values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert "image" not in service


# -- Grafana dashboard ---------------------------------------------------------------------------


def _datasource_uid() -> str:
    uids = [
        ds["uid"]
        for file in sorted(DATASOURCES.glob("*.yaml"))
        for ds in tools.load_yaml(file)["datasources"]
    ]
    return str(uids[0])


def test_dashboard_has_no_import_placeholders() -> None:
    text = tools.DASHBOARD.read_text()
    assert "__inputs" not in text
    assert "${DS_" not in text
    assert "__requires" not in text
    dashboard = tools.load_dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard.get("id") is None


def test_dashboard_layout_and_datasource() -> None:
    dashboard = tools.load_dashboard()
    uid = _datasource_uid()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    boxes: list[tuple[int, int, int, int, str]] = []
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0, panel["title"]
        assert 0 < g["w"] <= 24 - g["x"], panel["title"]
        for x0, y0, x1, y1, other in boxes:
            overlap = g["x"] < x1 and x0 < g["x"] + g["w"] and g["y"] < y1 and y0 < g["y"] + g["h"]
            assert not overlap, (panel["title"], other)
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], panel["title"]))
        refs = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(r == {"type": "prometheus", "uid": uid} for r in refs), panel["title"]
        assert panel["targets"], panel["title"]
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["instance"]
    assert variables[0]["datasource"] == {"type": "prometheus", "uid": uid}
    assert variables[0]["multi"]
    assert variables[0]["includeAll"]


def test_dashboard_queries_cover_the_issue_and_use_existing_metrics() -> None:
    registry = NodeMetrics().registry
    exported = {s.name for m in registry.collect() for s in m.samples} | {"up"}
    dashboard = tools.load_dashboard()
    queries = tools.dashboard_queries(dashboard)
    text = "\n".join(q.expr for q in queries)
    for q in queries:
        assert "$instance" in q.expr, f"{q.where} ignores the node selector"
        unknown = tools.metric_names(q.expr) - exported
        assert not unknown, f"{q.where}: {unknown} are not exported by the node"
    for needle in (
        "locoswarm_protocol_sent_bytes_total",
        "locoswarm_protocol_received_bytes_total",
        "locoswarm_trainer_idle_seconds_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "sum by (result)",
        "sum by (reason)",
        "locoswarm_trainer_loss",
        "locoswarm_trainer_tokens_total",
        "locoswarm_sync_outer_step",
        "locoswarm_peers_live",
        "locoswarm_trainer_validation_loss",
        "locoswarm_sync_partner_distance_bucket",
        "locoswarm_node_misconfigured",
        "locoswarm_peers_excluded",
        "locoswarm_sync_clipped_total",
        "locoswarm_peers_banned_total",
    ):
        assert needle in text, needle
    for _name, query in tools.variable_queries(dashboard):
        expr, label = tools.label_values_as_promql(query)
        assert label == "instance"
        assert not tools.metric_names(expr) - exported


def test_alert_rules_use_existing_metrics() -> None:
    registry = NodeMetrics().registry
    exported = {s.name for m in registry.collect() for s in m.samples} | {"up"}
    rules = tools.load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = tools.metric_names(rule["expr"]) - exported
            assert not unknown, (rule["alert"], unknown)
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
    assert {
        "LocoswarmNodeDown",
        "LocoswarmIdleFractionHigh",
        "LocoswarmExchangeFailuresRising",
        "LocoswarmNoPeers",
        "LocoswarmLossNotFinite",
        "LocoswarmDisagreementGrowing",
        "LocoswarmMisconfigured",
    } <= names


# -- systemd ------------------------------------------------------------------------------------


def test_systemd_unit_stops_gracefully_and_restarts_on_failure() -> None:
    unit = tools.unit_file()
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    timeout = tools.seconds(service["TimeoutStopSec"])
    assert timeout >= NodeConfig().shutdown_grace_s + 60, timeout
    assert service["User"] not in ("root", "0")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]


def test_systemd_command_and_config_file_load() -> None:
    unit = tools.unit_file()
    argv = shlex.split(unit["Service"]["ExecStart"][-1])
    assert argv[0].startswith("/"), argv
    assert argv[0].endswith("/locoswarm"), argv
    assert argv[1] == "run"
    args = argv[2:]
    config_at = args.index("--config") + 1
    shipped = DEPLOY / "systemd" / Path(args[config_at]).name
    assert shipped.is_file(), f"{args[config_at]}: ship an example as {shipped}"
    args[config_at] = str(shipped)
    config = _node_config(args, {})
    state = Path("/var/lib") / unit["Service"]["StateDirectory"][-1]
    assert config.checkpoint.dir is not None
    assert config.checkpoint.dir.is_relative_to(state)
    assert config.peers.identity_path is not None
    assert config.peers.identity_path.is_relative_to(state)
    assert config.metrics_port == METRICS_PORT
    assert config.protocol.port == GRPC_PORT
    assert config.peers.host_maddrs == (f"/ip4/0.0.0.0/tcp/{DHT_PORT}",)
    runtime = Path("/run") / unit["Service"]["RuntimeDirectory"][-1]
    assert config.ready_file is not None
    assert config.ready_file.is_relative_to(runtime)


# -- README --------------------------------------------------------------------------------------


def test_readme_covers_the_ways_to_deploy() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "locoswarm run",
        "docker compose",
        "agent",
        "remote_write",
        "prometheus/agent.yml",
        "http://127.0.0.1:3000",
        "systemd",
    ):
        assert needle in text, needle
    for link in re.findall(r"\]\((?!https?:)([^)#]+)", text):
        assert (DEPLOY / link).exists(), f"README links to missing {link}"
