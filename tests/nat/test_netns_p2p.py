"""Two hivemind peers, each behind its own NAT (Linux namespaces, see netns.py), open a libp2p
binary stream to each other and swap 100 KB both ways: first through the public relay, then, once
DCUtR hole punching has made a direct connection, over that one.

What it takes (hivemind 1.1.12's p2pd), learnt by leaving each piece out:

- NATed peers: ``client_mode=True, use_auto_relay=True, use_relay=True,
  force_reachability="private", trusted_relays=[relay maddr]`` and the p2pd flag
  ``-relayDiscovery=0``, which hivemind does not expose (``use_relay_discovery`` is a deprecated
  no-op), hence the wrapped ``P2P._make_process_args``. With discovery on, no relay reservation is
  made within 30 s and B's stream open fails with ``routing: not found``; without
  ``trusted_relays`` p2pd panics at start. Without ``force_reachability="private"`` AutoNAT takes
  ~15 s more to find out.
- Hole punching needs the peer's NATed address observed by 4 distinct public IPs: with the relay
  and 2 bare p2pd peers the connection stays relayed, with 3 or 4 it turns direct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nat.netns import NatTopology, netns_available, read_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYLOAD = 100_000  # per direction: under the 128 KiB at which a libp2p relay may cut a circuit
RELAY_PORT = 31337
DHT_KEY = "nat-test-peer-a"

# Runs inside a namespace: ``python node.py relay|serve|call CONFIG.json``.
NODE_SCRIPT = r"""
import asyncio, contextlib, hashlib, json, os, signal, sys, time

ROLE, CFG = sys.argv[1], json.loads(open(sys.argv[2]).read())
T0 = time.monotonic()


def log(*args):
    print(f"[{ROLE} {time.monotonic() - T0:6.2f}s]", *args, flush=True)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


async def wait_json(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


log("importing hivemind")
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.timed_storage import get_dht_time

log("imported")

if CFG.get("relay_discovery_off"):
    # p2pd's -relayDiscovery (default on) is not a P2P.create argument: append it
    _make_process_args = P2P._make_process_args
    P2P._make_process_args = staticmethod(
        lambda *a, **kw: [*_make_process_args(*a, **kw), "-relayDiscovery=0"]
    )


async def serve(node, maddrs, stop):
    served = []
    result = {"peer_id": node.peer_id.to_base58(), "maddrs": maddrs, "served": served}

    async def handler(info, reader, writer):
        data = await P2P.receive_raw_data(reader)
        served.append({"addr": str(info.addr), "sha256": hashlib.sha256(data).hexdigest()})
        log("served", served[-1])
        await P2P.send_raw_data(data[::-1], writer)
        writer.close()
        write_json(CFG["info"], result)

    await node.p2p.add_binary_stream_handler("test.echo", handler)
    value = {"peer_id": node.peer_id.to_base58(), "maddrs": maddrs}
    result["stored"] = bool(await node.store(CFG["dht_key"], value, get_dht_time() + 600))
    log("stored", result["stored"])
    write_json(CFG["info"], result)
    await stop.wait()


async def call(node, maddrs, stop):
    result = {"peer_id": node.peer_id.to_base58(), "maddrs": maddrs, "exchanges": []}
    deadline = time.monotonic() + CFG["dht_wait"]
    found = None
    while found is None and time.monotonic() < deadline:
        got = await node.get(CFG["dht_key"], latest=True)
        found = got.value if got is not None else None
        if found is None:
            await asyncio.sleep(0.5)
    result["dht_found"] = found
    log("dht get", found)
    if found is None:  # still try the stream, with A's id from its info file
        found = await wait_json(CFG["serve_info"], 15)
    peer = PeerID.from_base58(found["peer_id"])

    async def exchange():
        data = os.urandom(CFG["payload"])
        t = time.monotonic()
        info, reader, writer = await asyncio.wait_for(
            node.p2p.call_binary_stream_handler(peer, "test.echo"), 30
        )
        await P2P.send_raw_data(data, writer)
        back = await asyncio.wait_for(P2P.receive_raw_data(reader), 30)
        writer.close()
        result["exchanges"].append({
            "addr": str(info.addr),
            "sent_sha256": hashlib.sha256(data).hexdigest(),
            "ok": back == data[::-1],
            "received": len(back),
            "seconds": round(time.monotonic() - t, 3),
        })
        log("exchange", result["exchanges"][-1])

    try:
        await exchange()
        # hole punching (DCUtR) starts on the relayed connection: wait for a direct one
        deadline = time.monotonic() + CFG["direct_wait"]
        while time.monotonic() < deadline:
            conns = [str(p.addrs[0]) for p in await node.p2p.list_peers() if p.peer_id == peer]
            result["conns_to_peer"] = conns
            if any("/p2p-circuit" not in c for c in conns):
                await exchange()  # new streams prefer the direct connection
                break
            await asyncio.sleep(0.5)
        log("connections to peer", result.get("conns_to_peer"))
    except Exception as e:
        result["error"] = repr(e)
        log("error", repr(e))
    write_json(CFG["info"], result)
    await stop.wait()


async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if ROLE == "relay":
        node = await DHTNode.create(host_maddrs=CFG["host_maddrs"], **CFG["p2p_kwargs"])
    else:
        relay = await wait_json(CFG["relay_info"], 60)
        kwargs = dict(CFG["p2p_kwargs"])
        if CFG.get("trusted_relays"):
            kwargs["trusted_relays"] = relay["maddrs"]
        node = await DHTNode.create(
            initial_peers=[*relay["maddrs"], *CFG["public_peers"]],
            client_mode=True,
            host_maddrs=CFG["host_maddrs"],
            **kwargs,
        )
        # wait for the relay reservation: until then nobody can reach us
        deadline = time.monotonic() + CFG["reservation_wait"]
        while time.monotonic() < deadline:
            visible = await node.p2p.get_visible_maddrs(latest=True)
            if any("/p2p-circuit" in str(m) for m in visible):
                break
            await asyncio.sleep(0.25)
    maddrs = [str(m) for m in await node.p2p.get_visible_maddrs(latest=True)]
    log("up", node.peer_id, maddrs)
    if ROLE == "relay":
        write_json(CFG["info"], {"peer_id": node.peer_id.to_base58(), "maddrs": maddrs})
        await stop.wait()
    elif ROLE == "serve":
        await serve(node, maddrs, stop)
    else:
        await call(node, maddrs, stop)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.shutdown(), 5)


asyncio.run(main())
"""

NATED_P2P_KWARGS: dict[str, Any] = {
    "use_auto_relay": True,
    "use_relay": True,
    "force_reachability": "private",
}


@pytest.fixture
def topo() -> Iterator[NatTopology]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    topology = NatTopology(n_public_peers=4)
    try:
        topology.setup()
        yield topology
    finally:
        topology.teardown()


def _wait_for_file(
    path: Path, procs: dict[str, tuple[subprocess.Popen[bytes], Path]], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        for name, (proc, _log) in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}\n{_logs(procs)}")
        time.sleep(0.2)
    raise AssertionError(f"no {path.name} within {timeout_s}s\n{_logs(procs)}")


def _logs(procs: dict[str, tuple[subprocess.Popen[bytes], Path]]) -> str:
    return "\n".join(f"--- {name}\n{read_text(log)[-3000:]}" for name, (_p, log) in procs.items())


@pytest.mark.timeout(180)
def test_two_nated_peers_swap_100kb(topo: NatTopology, tmp_path: Path) -> None:
    t0 = time.monotonic()
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(name: str, ns: str, cfg: dict[str, Any]) -> None:
        cfg_path, log = tmp_path / f"{name}.cfg.json", tmp_path / f"{name}.log"
        cfg_path.write_text(json.dumps(cfg))
        with open(log, "wb") as out:
            argv = [sys.executable, str(script), name, str(cfg_path)]
            procs[name] = (topo.popen(ns, argv, env=env, stdout=out), log)

    info = {name: str(tmp_path / f"{name}.info.json") for name in ("relay", "serve", "call")}
    # Python startup (importing hivemind) takes seconds: start all three at once, the NATed
    # peers wait for the relay's info file.
    start("relay", topo.public_ns, {
        "info": info["relay"],
        "host_maddrs": [f"/ip4/{topo.public_ip}/tcp/{RELAY_PORT}"],
        "p2p_kwargs": {},
    })  # fmt: skip
    public_peers = topo.start_public_peers(tmp_path)
    nated = {
        "relay_info": info["relay"],
        "public_peers": public_peers,
        "host_maddrs": ["/ip4/0.0.0.0/tcp/0"],
        "p2p_kwargs": NATED_P2P_KWARGS,
        "trusted_relays": True,
        "relay_discovery_off": True,
        "dht_key": DHT_KEY,
        "payload": PAYLOAD,
        "reservation_wait": 30,
        "dht_wait": 20,
        "direct_wait": 15,
    }
    start("serve", topo.nat_a_ns, {**nated, "info": info["serve"]})
    start("call", topo.nat_b_ns, {**nated, "info": info["call"], "serve_info": info["serve"]})

    b = _wait_for_file(Path(info["call"]), procs, timeout_s=120)
    a = _wait_for_file(Path(info["serve"]), procs, timeout_s=5)
    deadline = time.monotonic() + 5  # A rewrites its info file once its handler has answered
    while len(a["served"]) < len(b["exchanges"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        a = dict(json.loads(Path(info["serve"]).read_text()))
    elapsed = time.monotonic() - t0

    exchanges = b["exchanges"]
    path = "direct" if any("/p2p-circuit" not in e["addr"] for e in exchanges) else "relayed"
    print(
        f"\nNAT test: {elapsed:.1f}s, path={path}, dht_found={b['dht_found'] is not None}, "
        f"connections B->A={b.get('conns_to_peer')}"
    )
    for e in exchanges:
        print(f"  exchange via {e['addr']}: ok={e['ok']} {e['seconds']}s")

    details = json.dumps({"a": a, "b": b}, indent=1) + "\n" + _logs(procs)
    assert "error" not in b, details
    assert a["stored"], details
    assert any("/p2p-circuit" in m for m in a["maddrs"]), details
    # B found A through the DHT (stored by A on the public DHT server)
    assert b["dht_found"] is not None, details
    assert b["dht_found"]["peer_id"] == a["peer_id"], details
    # the first stream had to go through the relay: the routers drop unsolicited inbound packets
    assert exchanges, details
    assert "/p2p-circuit" in exchanges[0]["addr"], details
    for e in exchanges:
        assert e["ok"], details
        assert e["received"] == PAYLOAD, details
    # A received every byte B sent, on the same kind of connection
    assert [s["sha256"] for s in a["served"]] == [e["sent_sha256"] for e in exchanges], details
    assert [s["addr"].endswith("/p2p-circuit") for s in a["served"]] == [
        e["addr"].endswith("/p2p-circuit") for e in exchanges
    ], details
