"""``locoswarm run``, ``locoswarm status`` and ``locoswarm demo``: flags to config, signals, exit.

Only this module and ``cli.py`` touch signals: the first SIGINT or SIGTERM asks the daemon to
stop gracefully; a second one kills the node's child processes (DHT, p2pd) and exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from locoswarm.compression.config import CODEC_CHOICES
from locoswarm.errors import ConfigError, PeerError

# flag -> dotted config key
_RUN_FLAGS: dict[str, str] = {
    "run_id": "run_id",
    "sync": "sync.mode",
    "inner_steps": "sync.inner_steps",
    "rounds": "sync.rounds",
    "outer_lr": "sync.outer_lr",
    "outer_momentum": "sync.outer_momentum",
    "match_deadline": "sync.match_deadline_s",
    "group_size": "sync.group_size",
    "codec": "sync.codec",
    "bits": "sync.bits",
    "pairing": "peers.pairing",
    "task": "task.name",
    "batch_size": "task.batch_size",
    "seq_len": "task.seq_len",
    "max_bytes": "task.max_bytes",
    "device": "trainer.device",
    "seed": "trainer.seed",
    "lr": "trainer.inner.lr",
    "warmup_steps": "trainer.inner.warmup_steps",
    "threads": "trainer.threads",
    "host": "protocol.host",
    "port": "protocol.port",
    "announce": "announce",
    "secret_file": "secret_file",
    "tls_cert": "protocol.tls.cert_file",
    "tls_key": "protocol.tls.key_file",
    "tls_ca": "protocol.tls.ca_file",
    "checkpoint_dir": "checkpoint.dir",
    "checkpoint_every": "checkpoint.every_rounds",
    "metrics_port": "metrics_port",
    "ready_file": "ready_file",
    "log_every": "log_every_s",
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML file with config sections")
    p.add_argument(
        "--join",
        nargs="+",
        default=[],
        metavar="MULTIADDR",
        help="join the swarm of a running node (its printed multiaddr)",
    )
    p.add_argument("--run-id", help="swarm name (default locoswarm)")
    p.add_argument("--sync", choices=("noloco", "diloco", "ef"), help="sync mode (default noloco)")
    p.add_argument("--inner-steps", type=int, help="H, inner steps per round (default 50)")
    p.add_argument("--rounds", type=int, help="stop after N rounds (default: run until stopped)")
    p.add_argument("--outer-lr", type=float, help="noloco beta / diloco lr / ef lr")
    p.add_argument("--outer-momentum", type=float, help="noloco alpha / diloco momentum")
    p.add_argument("--match-deadline", type=float, help="seconds to find a partner per round")
    p.add_argument("--group-size", type=int, help="diloco: nodes per group (default 2)")
    p.add_argument(
        "--bits",
        type=int,
        choices=(1, 2, 4, 8, 16, 32),
        help="proposal width on the wire (diloco default 16, ef default 4)",
    )
    p.add_argument("--codec", choices=CODEC_CHOICES, help="ef --set sync.design=pull: step codec")
    p.add_argument(
        "--pairing", choices=("random", "hypercube"), help="partner schedule (default random)"
    )
    p.add_argument("--task", help="tiny|small|base or module:function (default tiny)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="text file or folder to train on (repeatable; default: Python's stdlib)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max-bytes", type=int, help="cap on training bytes (quick runs)")
    p.add_argument("--device", help="auto|cuda|cuda:N|cpu (default auto)")
    p.add_argument("--seed", type=int, help="initial-weight seed, the same on every node")
    p.add_argument("--lr", type=float, help="inner AdamW learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--host", help="address the gRPC server and the DHT bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default: any free port)")
    p.add_argument("--dht-port", type=int, help="DHT port (default: any free port)")
    p.add_argument("--announce", metavar="HOST:PORT", help="gRPC address others should dial")
    p.add_argument(
        "--client-mode",
        action="store_true",
        help="no inbound connections: only dial out (behind NAT)",
    )
    p.add_argument("--secret-file", type=Path, help="swarm secret (>= 16 bytes) for call auth")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="CA that signs the swarm's certificates")
    p.add_argument("--tls-mutual", action="store_true", help="require client certificates")
    p.add_argument("--checkpoint-dir", type=Path)
    p.add_argument("--checkpoint-every", type=int, help="rounds between checkpoints (default 10)")
    p.add_argument("--metrics-port", help="Prometheus port (default 9310; 0: any; off: none)")
    p.add_argument("--max-upload-mbps", type=float, help="cap on what this node sends, Mbit/s")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="wait for each outer step instead of overlapping it with training",
    )
    p.add_argument("--ready-file", type=Path, help="write the node's addresses as JSON here")
    p.add_argument("--log-every", type=float, help="seconds between progress lines (default 10)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set peers.record_ttl_s=20 (repeatable)",
    )
    p.set_defaults(func=cmd_run)


def overrides_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys the flags set (flags left out keep file/env/default values)."""
    out: dict[str, Any] = {}
    for flag, key in _RUN_FLAGS.items():
        value = getattr(a, flag, None)
        if value is not None:
            out[key] = value
    if a.metrics_port is not None and str(a.metrics_port).lower() in ("off", "none"):
        out["metrics_port"] = None
    if a.data:
        out["task.data"] = tuple(a.data)
    if a.join:
        out["peers.initial_peers"] = tuple(a.join)
    if a.client_mode:
        out["peers.client_mode"] = True
    if a.tls_mutual:
        out["protocol.tls.require_client_auth"] = True
    if a.blocking:
        out["sync.overlap"] = False
    if a.max_upload_mbps is not None:
        out["protocol.max_upload_bytes_per_s"] = a.max_upload_mbps * 1e6 / 8
    if a.host is not None or a.dht_port is not None:  # else keep file/env/default DHT addresses
        out["peers.host_maddrs"] = (f"/ip4/{a.host or '0.0.0.0'}/tcp/{a.dht_port or 0}",)
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _kill_children() -> None:
    """SIGKILL every process below us (the DHT process and its p2pd)."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [me], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _serve(config: Any) -> int:
    from locoswarm.node.daemon import Daemon

    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        if received == 1:
            print(
                "stopping: finishing the outer step in flight, then a checkpoint "
                "(signal again to force)",
                file=sys.stderr,
                flush=True,
            )
            daemon.request_stop()
        else:
            print("forced exit", file=sys.stderr, flush=True)
            _kill_children()
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await daemon.run()
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    import uvloop

    from locoswarm.node.config import load_config

    config = load_config(a.config, overrides_from_args(a))
    return int(uvloop.run(_serve(config)))


# -- status ------------------------------------------------------------------------------------


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", default="127.0.0.1:50051", help="node's gRPC HOST:PORT")
    p.add_argument("--secret-file", type=Path, help="swarm secret, when the swarm uses one")
    p.add_argument("--tls-ca", type=Path, help="CA to verify a TLS node")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)


def cmd_status(a: argparse.Namespace) -> int:
    import dataclasses

    from locoswarm.node.daemon import _read_secret
    from locoswarm.protocol import AuthConfig, PeerClient, ProtocolConfig, TlsConfig

    config = ProtocolConfig(
        auth=AuthConfig(secret=_read_secret(a.secret_file)), tls=TlsConfig(ca_file=a.tls_ca)
    )

    async def ask() -> dict[str, Any]:
        async with PeerClient(config, peer_id="locoswarm-status") as client:
            return dataclasses.asdict(await client.status(a.address))

    try:
        info = asyncio.run(ask())
    except PeerError as exc:
        print(f"locoswarm status: {a.address}: {exc}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


# -- demo --------------------------------------------------------------------------------------


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="local nodes (default 3)")
    p.add_argument("--sync", choices=("noloco", "diloco", "ef"), default="noloco")
    p.add_argument("--rounds", type=int, default=0, help="stop after N rounds (default: Ctrl-C)")
    p.add_argument("--inner-steps", type=int, default=25)
    p.add_argument("--dir", type=Path, default=None, help="where logs and checkpoints go")
    p.set_defaults(func=cmd_demo)


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"a demo node exited early (status {proc.returncode}); see its log")
        if path.exists() and path.read_text().strip():
            return dict(json.loads(path.read_text()))
        time.sleep(0.2)
    raise ConfigError(f"a demo node did not start within {timeout_s:.0f}s")


def cmd_demo(a: argparse.Namespace) -> int:
    if a.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    workdir = a.dir or Path(tempfile.mkdtemp(prefix="locoswarm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.nodes)
    procs: list[subprocess.Popen[bytes]] = []
    join: list[str] = []
    print(f"locoswarm demo: {a.nodes} nodes ({a.sync}) on 127.0.0.1; logs in {workdir}")
    try:
        for i in range(a.nodes):
            ready = workdir / f"node{i}.json"
            ready.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "locoswarm",
                "run",
                "--host",
                "127.0.0.1",
                "--sync",
                a.sync,
                "--inner-steps",
                str(a.inner_steps),
                "--metrics-port",
                "0",
                "--threads",
                str(threads),
                "--ready-file",
                str(ready),
                "--seed",
                "0",
                "--checkpoint-dir",
                str(workdir / f"node{i}-ckpt"),
                "--log-every",
                "5",
                "--rounds",
                str(a.rounds),
                *(["--join", *join] if join else []),
            ]
            log = open(workdir / f"node{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            info = _wait_ready(ready, procs[-1], 120)
            join = info["maddrs"][:1]
            print(
                f"  node{i}: gRPC {info['grpc']}  metrics {info.get('metrics')}  "
                f"log {workdir / f'node{i}.log'}"
            )
        print("training; Ctrl-C stops every node (each writes a checkpoint first)")
        shown = [0] * len(procs)
        running = True
        while running:
            running = any(p.poll() is None for p in procs)
            time.sleep(1 if running else 0)
            for i in range(len(procs)):
                lines = (workdir / f"node{i}.log").read_text(errors="replace").splitlines()
                rounds = [ln.split(": ", 1)[-1] for ln in lines if "train loss" in ln]
                for line in rounds[shown[i] :]:
                    print(f"  node{i} {line}", flush=True)
                shown[i] = len(rounds)
    except KeyboardInterrupt:
        print("stopping the demo nodes...")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return 0
