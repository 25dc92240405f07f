"""``locoswarm run``, ``locoswarm status`` and ``locoswarm demo``: flags to config, signals, exit.

Only this module and ``cli.py`` touch signals: the first SIGINT or SIGTERM asks the daemon to
stop gracefully; a second one kills the node's child processes (DHT, p2pd) and exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
from locoswarm.node import processes
from locoswarm.node.config import NodeConfig, load_config
from locoswarm.node.presets import PRESETS, preset
from locoswarm.peers.config import say_default_pairing
from locoswarm.settings import Flag, add_flags, flag_values
from locoswarm.sync.round_config import WIDTHS, say_mode_defaults

# Every ``run`` flag that sets one NodeConfig field; name, type, default and help come from it.
RUN_FLAGS: tuple[Flag, ...] = (
    Flag("run_id"),
    Flag("sync.mode", "--sync"),
    Flag("sync.inner_steps"),
    Flag("sync.rounds"),
    Flag("sync.outer_lr", default=say_mode_defaults("lr")),
    Flag("sync.outer_momentum", default=say_mode_defaults("momentum")),
    Flag("sync.match_deadline_s", "--match-deadline"),
    Flag("sync.group_size"),
    Flag("sync.bits", default=say_mode_defaults("bits", ("diloco", "ef")), choices=WIDTHS),
    Flag("sync.codec", choices=CODEC_CHOICES),
    Flag("peers.pairing", default=say_default_pairing),
    Flag("task.name", "--task"),
    Flag("task.data", repeat=True, metavar="PATH"),
    Flag("task.batch_size"),
    Flag("task.seq_len"),
    Flag("task.max_bytes"),
    Flag("task.model", metavar="DIR"),
    Flag("task.tokenizer", metavar="DIR"),
    Flag(
        "task.from_scratch",
        "--from-pretrained",
        const=False,
        help="hf: start from the weights in --model instead of drawing them from the seed",
    ),
    Flag("trainer.device"),
    Flag("trainer.seed"),
    Flag("trainer.inner.lr", "--lr"),
    Flag("trainer.inner.warmup_steps"),
    Flag("trainer.threads"),
    Flag("trainer.nproc_per_node", metavar="N"),
    Flag("trainer.eval_every"),
    Flag("task.val_batches"),
    Flag("protocol.host", help="address the gRPC server and the DHT bind"),
    Flag("protocol.port"),
    Flag("announce", metavar="HOST:PORT"),
    Flag("peers.initial_peers", "--join", repeat=True, metavar="MULTIADDR"),
    Flag("peers.client_mode", const=True),
    Flag("secret_file"),
    Flag("protocol.tls.cert_file", "--tls-cert"),
    Flag("protocol.tls.key_file", "--tls-key"),
    Flag("protocol.tls.ca_file", "--tls-ca"),
    Flag("protocol.tls.require_client_auth", "--tls-mutual", const=True),
    Flag("checkpoint.dir", "--checkpoint-dir"),
    Flag("checkpoint.every_rounds", "--checkpoint-every"),
    Flag("metrics_port", none_word="off"),
    Flag(
        "protocol.max_upload_bytes_per_s",
        "--max-upload-mbps",
        scale=1e6 / 8,
        help="cap on what this node sends",
        unit="Mbit/s",
    ),
    Flag(
        "sync.overlap",
        "--blocking",
        const=False,
        help="wait for each outer step instead of overlapping it with training",
    ),
    Flag("ready_file"),
    Flag("log_every_s", "--log-every"),
)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML file with config sections")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="start from a named preset (below the file, the environment and the flags)",
    )
    add_flags(p, NodeConfig, RUN_FLAGS)
    p.add_argument("--dht-port", type=int, help="DHT port (default: any free port)")
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
    out = flag_values(a, RUN_FLAGS)
    host = out.get("protocol.host")
    if host is not None or a.dht_port is not None:  # else keep file/env/default DHT addresses
        out["peers.host_maddrs"] = (f"/ip4/{host or '0.0.0.0'}/tcp/{a.dht_port or 0}",)
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


_ECHO_S = 5.0
"""A rank of a multi-rank node gets a terminal's Ctrl-C twice within this many seconds (from the
terminal and from the launcher): the second is not a request to force."""


async def _serve(config: Any, ranks: Any = None) -> int:
    from locoswarm.node.daemon import Daemon
    from locoswarm.node.ranks import note_stop_signal

    daemon = Daemon(config, ranks)
    loop = asyncio.get_running_loop()
    received = 0
    first = 0.0

    def on_signal() -> None:
        nonlocal received, first
        note_stop_signal()
        if ranks is not None and received and time.monotonic() - first < _ECHO_S:
            return  # the launcher passing on the signal this rank already got (Ctrl-C)
        received += 1
        if received == 1:
            first = time.monotonic()
            print(
                "stopping: finishing the outer step in flight, then a checkpoint "
                "(signal again to force)",
                file=sys.stderr,
                flush=True,
            )
            daemon.request_stop()
        else:
            print("forced exit", file=sys.stderr, flush=True)
            processes.kill_tree(os.getpid(), include_self=False)  # the DHT process, p2pd
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await daemon.run()
    return 0


def config_from_args(a: argparse.Namespace, environ: dict[str, str] | None = None) -> NodeConfig:
    """The node's config: defaults < ``--preset`` < ``--config`` file < environment < flags."""
    base = preset(a.preset) if a.preset else None
    return load_config(a.config, overrides_from_args(a), environ=environ, base=base)


def cmd_run(a: argparse.Namespace) -> int:
    import uvloop

    from locoswarm.node import ranks as local_ranks

    config = config_from_args(a)
    nproc = config.trainer.nproc_per_node
    if nproc > 1 and not local_ranks.under_launcher():
        local_ranks.check_nproc(nproc, config.trainer.device)
        grace = config.shutdown_grace_s + 10
        return local_ranks.launch(a.argv, nproc, shutdown_timeout_s=grace)
    if not local_ranks.under_launcher():
        return int(uvloop.run(_serve(config)))
    ranks = local_ranks.Ranks(
        timeout_s=config.trainer.rank_timeout_s, device_name=config.trainer.device
    )
    code = 1
    try:
        if ranks.leader:
            code = int(uvloop.run(_serve(config, ranks)))
            if ranks.lost:
                print("locoswarm: rank 0 stopped: another rank was lost", file=sys.stderr)
                code = 1
        else:
            from locoswarm.node.daemon import follow

            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 stops the node and then us
                signal.signal(sig, local_ranks.note_stop_signal)
            code = follow(config, ranks)
    finally:
        if ranks.lost:
            # The node has stopped (checkpoint written, DHT left). Exit at once: the process
            # group's teardown would wait for the rank that is gone.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


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
        print(f"locoswarm status: {a.address}: {exc}{status_fix(exc, a)}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def status_fix(exc: PeerError, a: argparse.Namespace) -> str:
    """What to do about a failed ``status`` call, when the error says."""
    text = str(exc).lower()
    if exc.reason == "unauthenticated":
        if a.secret_file is None:
            return "\n  the node requires the swarm secret: add --secret-file PATH"
        return f"\n  the node refused the secret in {a.secret_file}: use the swarm's secret file"
    if any(word in text for word in ("ssl", "tls", "handshake", "certificate")):
        if a.tls_ca is None:
            return "\n  the node may use TLS: add --tls-ca CA.pem (the CA of its certificate)"
        return f"\n  TLS failed: check that {a.tls_ca} is the CA of the node's certificate"
    return ""


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
                # Every node holds its first round until the others are up (the tiny task
                # trains a few rounds in the time a node takes to start).
                "--set",
                f"peers.min_peers={a.nodes - 1}",
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
