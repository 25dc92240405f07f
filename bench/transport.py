"""Transport benchmark: a two-way payload swap over 127.0.0.1 by locoswarm, raw TCP and hivemind.

Usage: python -m bench.transport [--quick] --json out/transport.json [--png out/transport.png]

Two processes swap N bytes each way (N = 100,000,000, i.e. 25M fp32; ``--quick``: 8,000,000):

- ``raw_tcp``: one plain TCP connection; each side sends its N bytes from a thread while its main
  thread receives the other's N bytes with ``recv_into`` into a preallocated buffer. The limit.
- ``raw_tcp_tls``: the same over TLS (python ``ssl``, one non-blocking loop per side).
- ``locoswarm`` / ``locoswarm_tls``: one ``PeerClient.exchange`` against a ``PeerServer``
  (gRPC, plaintext / TLS with a throw-away CA and a server certificate for 127.0.0.1 and
  localhost). Each side owns a 1-D fp32 torch tensor and does what a daemon's pair round does, in
  the timing: sends it as a view of its memory (``rounds.fp32_part``) and computes the pair's
  mean in the received buffer (``rounds.pair_mean_into``), which becomes its tensor. Both sides
  must end with the same mean, bit for bit.
- ``locoswarm_stream``: the same ``PeerClient.exchange`` and servicer over the byte-stream
  carrier (``protocol/bytestream.py``, the libp2p path's framing) on one plain TCP connection
  per call instead of gRPC: what the frames cost without gRPC-python.
- ``hivemind``: ``DecentralizedAverager.step()`` with ``target_group_size=2`` on a 1-D fp32
  tensor of N/4 elements; each process owns a ``hivemind.DHT``, the second joins the first. The
  time is the whole step (matchmaking + all-reduce) after a warm-up step.

Each method runs in a fresh pair of processes (``python -m bench.transport --role ...``, each in
its own session, so the process group, hivemind's DHT and ``p2pd`` included, is killed at the
end). The listening side binds port 0 and reports the bound port over a socket pair. Per round
the parent sends both sides "go" with a start instant ``t0`` on the shared monotonic clock; a
round takes ``max(done_listen, done_dial) - t0``, where a side is done once it holds the other
side's complete payload (the dialler's exchange includes the whole round trip). One warm-up
round, then ``--repeats`` timed rounds; the median is reported with every time. GB/s is
``2 * N / seconds / 1e9`` (bytes moved in both directions). A method that fails is recorded as
``"error": "<type>: <message>"`` and the benchmark carries on. Writes JSON (header, per-method
results, ratios and target checks) and a PNG bar chart; prints a table to stderr.

The locoswarm workers apply a node's C allocator settings (``node.allocator``: the mmap and trim
thresholds, the arena cap) and, after each round and outside its timing, hand the heaps' free
memory back as a node does; ``--allocator glibc`` leaves glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import finite as _finite
from bench.common import print_checks, source
from bench.common import version as _version

FULL_BYTES = 100_000_000
QUICK_BYTES = 8_000_000
FULL_REPEATS = 3
QUICK_REPEATS = 1
WARMUP = 1
CHUNK_BYTES = 4 << 20
"""locoswarm's ``ProtocolConfig.chunk_bytes`` for the exchange."""
RAW_RECV_BYTES = 1 << 20
"""Most bytes one ``recv_into`` asks for (raw TCP)."""
TLS_SEND_BYTES = 256 << 10
"""Bytes handed to one ``SSLSocket.send`` (raw TCP over TLS)."""
METHODS = ("raw_tcp", "raw_tcp_tls", "locoswarm", "locoswarm_tls", "locoswarm_stream", "hivemind")
ROLES = ("listen", "dial")
HOST = "127.0.0.1"
RUN_ID = "bench"
FINGERPRINT = "fp"
SEEDS = {"listen": 1, "dial": 2}

# hivemind's averager: matchmaking waits at least min_matchmaking_time for more peers unless the
# group is full (target_group_size=2 fills it as soon as the second peer joins).
HM_MIN_MATCHMAKING_S = 0.5
HM_REQUEST_TIMEOUT_S = 0.25
HM_STEP_TIMEOUT_S = 60.0
HM_POLL_S = 0.002
HM_TOLERANCE = 1e-5
"""Largest |averaged - (a + b) / 2| accepted on either side (hivemind adds deltas)."""

SETUP_TIMEOUT_S = 120.0
LEAD_S = {"hivemind": 0.2}
"""How far ahead of "now" the parent puts a round's start instant (default 0.05 s)."""
STOP_TIMEOUT_S = 15.0
FAILED_STOP_S = 3.0
"""Grace for the workers of a method that failed (one of them may be stuck)."""

HIVEMIND_SPEEDUP = 3.0  # issue 14
RAW_FRACTION = 0.20  # issue 14
TLS_COST_MAX = 0.35

INCLUDES = {
    "raw_tcp": "bytes only: sendall of a bytes object from a thread, recv_into a preallocated "
    "bytearray, one TCP connection set up before the rounds (TCP_NODELAY)",
    "raw_tcp_tls": "as raw_tcp over TLS (python ssl, negotiated cipher in 'cipher'); one "
    "non-blocking send/recv_into loop per side; handshake before the rounds",
    "locoswarm": "what a daemon's pair round does on both sides: the tensor sent as a view of its "
    "memory (rounds.fp32_part), one PeerClient.exchange (header, accept, chunks, trailer, CRC-32 "
    "and limit checks, the server's reply), the pair's mean computed in the received buffer "
    "(rounds.pair_mean_into), which becomes the side's tensor; the channel is opened in the "
    "warm-up round; tensor_ops_s gives the torch part of each side",
    "locoswarm_tls": "as locoswarm with TLS on (gRPC ssl credentials, CA-verified server cert)",
    "locoswarm_stream": "as locoswarm, the frames over the byte-stream carrier (varint-framed "
    "on an asyncio TCP stream, a new connection per call) instead of gRPC",
    "hivemind": "averager.step(): matchmaking through the DHT and the all-reduce through p2pd "
    "(libp2p, which encrypts by default), including hivemind's in-place update of the tensor; "
    "allreduce_s runs from the first side seen in RUNNING_ALLREDUCE (polled every "
    f"{HM_POLL_S * 1000:g} ms) to both steps done, matchmaking_s is the rest",
}


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _usage() -> tuple[float, int]:
    """(CPU seconds, user and system, of this process's threads; minor page faults) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def _usage_since(before: tuple[float, int]) -> dict[str, float]:
    """What ``_usage`` grew by since ``before``: this side's CPU time and page faults in a round."""
    cpu, faults = _usage()
    return {"cpu_s": cpu - before[0], "minor_faults": faults - before[1]}


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


async def _asleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def make_certs(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""
    from locoswarm.protocol.certs import make_ca, make_leaf, write_pem

    ca = make_ca("locoswarm bench CA")
    _, ca_path = write_pem(ca, directory, "ca")
    key_path, cert_path = write_pem(make_leaf(ca, "bench-server"), directory, "server")
    return {"ca": ca_path, "cert": cert_path, "key": key_path}


def _cert_paths(cert_dir: str) -> dict[str, Path]:
    d = Path(cert_dir)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


# ----------------------------------------------------------------------------------------------
# Worker side: one process of a pair. Talks to the parent over ``conn`` with (kind, value) tuples:
# worker -> parent: ("addr", a) [listen side], ("ready", info), ("done", info), ("check", info),
# ("error", text); parent -> worker: ("addr", a) [dial side], ("go", t0_monotonic, t0_wall),
# ("check",), ("stop",).


@dataclass
class WorkerArgs:
    method: str
    role: str
    num_bytes: int
    chunk_bytes: int
    cert_dir: str | None
    allocator: str = "node"


def _expect(conn: Connection, kind: str) -> Any:
    msg = conn.recv()
    if msg[0] != kind:
        raise RuntimeError(f"expected {kind!r} from the parent, got {msg[0]!r}")
    return msg[1] if len(msg) > 1 else None


def _serve_rounds(conn: Connection, do_round: Any, do_check: Any) -> None:
    """The worker's loop after setup: answer go/check until stop."""
    while True:
        msg = conn.recv()
        if msg[0] == "go":
            conn.send(("done", do_round(msg[1], msg[2])))
        elif msg[0] == "check":
            conn.send(("check", do_check()))
        elif msg[0] == "stop":
            return
        else:
            raise RuntimeError(f"unexpected message {msg[0]!r}")


def _swap_plain(sock: socket.socket, payload: bytes, buf: bytearray) -> None:
    """Send ``payload`` from a thread while receiving ``len(buf)`` bytes into ``buf``."""
    failed: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
        except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
            failed.append(exc)

    sender = threading.Thread(target=send, name="raw-send", daemon=True)
    sender.start()
    view = memoryview(buf)
    got, total = 0, len(buf)
    try:
        while got < total:
            k = sock.recv_into(view[got:], min(total - got, RAW_RECV_BYTES))
            if k == 0:
                raise ConnectionError(f"peer closed after {got} of {total} bytes")
            got += k
    finally:
        sender.join(sock.gettimeout())
    if sender.is_alive():
        raise TimeoutError("send did not finish")
    if failed:
        raise failed[0]


def _swap_tls(sock: ssl.SSLSocket, payload: bytes, buf: bytearray, timeout_s: float) -> None:
    """Full-duplex swap on a non-blocking TLS socket from one thread."""
    deadline = time.monotonic() + timeout_s
    out, into = memoryview(payload), memoryview(buf)
    sent = got = 0
    total_out, total_in = len(payload), len(buf)
    while sent < total_out or got < total_in:
        progressed = False
        want_read = want_write = False
        if sent < total_out:
            try:
                sent += sock.send(out[sent : sent + TLS_SEND_BYTES])
                progressed = True
            except ssl.SSLWantReadError:
                want_read = True
            except (ssl.SSLWantWriteError, BlockingIOError):
                want_write = True
        if got < total_in:
            try:
                k = sock.recv_into(into[got:], total_in - got)
                if k == 0:
                    raise ConnectionError(f"peer closed after {got} of {total_in} bytes")
                got += k
                progressed = True
            except (ssl.SSLWantReadError, BlockingIOError):
                want_read = True
            except ssl.SSLWantWriteError:
                want_write = True
        if progressed:
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"TLS swap: {sent} sent, {got} received after {timeout_s:.0f}s")
        select.select([sock] if want_read else [], [sock] if want_write else [], [], 0.5)


def _raw_worker(conn: Connection, a: WorkerArgs) -> None:
    tls = a.method == "raw_tcp_tls"
    timeout_s = _round_timeout(a.num_bytes)
    if a.role == "listen":
        with socket.create_server((HOST, 0)) as lsock:
            conn.send(("addr", lsock.getsockname()[1]))
            lsock.settimeout(SETUP_TIMEOUT_S)
            sock, _ = lsock.accept()
    else:
        port = _expect(conn, "addr")
        sock = socket.create_connection((HOST, port), timeout=SETUP_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    info: dict[str, Any] = {}
    if tls:
        assert a.cert_dir is not None
        certs = _cert_paths(a.cert_dir)
        if a.role == "listen":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certs["cert"], certs["key"])
            sock = ctx.wrap_socket(sock, server_side=True)
        else:
            ctx = ssl.create_default_context(cafile=str(certs["ca"]))
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
        assert isinstance(sock, ssl.SSLSocket)
        info["cipher"] = sock.cipher()
        info["tls_version"] = sock.version()
        sock.setblocking(False)
    else:
        sock.settimeout(timeout_s)
    payload = os.urandom(a.num_bytes)
    buf = bytearray(a.num_bytes)
    conn.send(("ready", info))

    def do_round(t0: float, _wall: float) -> dict[str, Any]:
        _sleep_until(t0)
        before = _usage()
        if isinstance(sock, ssl.SSLSocket):
            _swap_tls(sock, payload, buf, timeout_s)
        else:
            _swap_plain(sock, payload, buf)
        return {"t_done": time.monotonic(), **_usage_since(before)}

    def do_check() -> dict[str, Any]:
        return {"sent_crc": zlib.crc32(payload), "recv_crc": zlib.crc32(buf)}

    try:
        _serve_rounds(conn, do_round, do_check)
    finally:
        sock.close()


def _locoswarm_worker(conn: Connection, a: WorkerArgs) -> None:
    import uvloop

    if a.allocator == "node":  # a node's C allocator settings, before any thread or tensor
        from locoswarm.node.allocator import tune_for

        tune_for()
    uvloop.run(_locoswarm_main(conn, a))


def _between_rounds(a: WorkerArgs) -> None:
    """What a node does after a round, outside the timing: hands the heaps' free memory back."""
    if a.allocator == "node":
        from locoswarm.node.allocator import release_free_memory

        release_free_memory()


async def _locoswarm_main(conn: Connection, a: WorkerArgs) -> None:
    import torch

    from locoswarm.protocol import (
        Header,
        LocalView,
        Outgoing,
        PeerClient,
        PeerServer,
        ProtocolConfig,
        Received,
        StatusInfo,
        TensorSpec,
        TlsConfig,
    )
    from locoswarm.protocol.bytestream import StreamRoute
    from locoswarm.protocol.frames import Payload
    from locoswarm.protocol.server import Servicer
    from locoswarm.sync import rounds

    numel = a.num_bytes // 4
    x = torch.randn(numel, generator=torch.Generator().manual_seed(SEEDS[a.role]))
    view = LocalView(run_id=RUN_ID, model_fingerprint=FINGERPRINT, outer_step=0)
    tls = TlsConfig()
    if a.method == "locoswarm_tls":
        assert a.cert_dir is not None
        certs = _cert_paths(a.cert_dir)
        if a.role == "listen":
            tls = TlsConfig(cert_file=certs["cert"], key_file=certs["key"], ca_file=certs["ca"])
        else:
            tls = TlsConfig(ca_file=certs["ca"])
    config = ProtocolConfig(host=HOST, port=0, chunk_bytes=a.chunk_bytes, tls=tls)

    def header(sender: str) -> Header:
        spec = TensorSpec(
            name="w", codec="fp32", dtype="float32", shape=(numel,), num_bytes=4 * numel
        )
        return Header(
            run_id=RUN_ID,
            outer_step=0,
            strategy="noloco",
            sender_id=sender,
            model_fingerprint=FINGERPRINT,
            tensors=(spec,),
        )

    async def recv() -> Any:
        return await asyncio.to_thread(conn.recv)

    def wire(t: torch.Tensor) -> Payload:
        # What a round sends: a view of the tensor's memory (never changed in place), no copy.
        return rounds.fp32_part(t, "w").payload

    def mean(own: torch.Tensor, received: Received) -> torch.Tensor:
        # What a round does with a pair's message: the mean in the received buffer itself.
        theirs = torch.frombuffer(received.payload, dtype=torch.float32)
        return rounds.pair_mean_into({"w": own}, {"w": theirs})["w"]

    info = {"torch_threads": torch.get_num_threads()}

    if a.role == "listen":

        class Handler:
            def __init__(self) -> None:
                self.received = asyncio.Event()
                self.t_done = 0.0
                self.tensor_s = 0.0
                self.x = x

            def local_view(self) -> LocalView:
                return view

            async def admit(self, peer: str, _header: Header) -> Outgoing:
                # Our side of the swap is ready when the request arrives: both cross at once.
                start = time.monotonic()
                out = wire(self.x)
                self.tensor_s = time.monotonic() - start
                return Outgoing(header=header("listen"), payload=out)

            async def on_exchange(self, peer: str, received: Received) -> None:
                self.t_done = time.monotonic()
                self.x = mean(self.x, received)
                self.tensor_s += time.monotonic() - self.t_done
                self.received.set()

            def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
                pass

            async def on_fetch_state(self, peer: str) -> Outgoing:
                raise NotImplementedError

            def status(self) -> StatusInfo:
                return StatusInfo(
                    peer_id="listen",
                    run_id=RUN_ID,
                    outer_step=0,
                    strategy="noloco",
                    version="bench",
                    num_peers=1,
                    bytes_sent=0,
                    bytes_received=0,
                    model_fingerprint=FINGERPRINT,
                )

            def on_transfer(self, direction: str, num_bytes: int) -> None:
                pass

            def on_reject(self, reason: str) -> None:
                pass

        handler = Handler()
        async with contextlib.AsyncExitStack() as stack:
            if a.method == "locoswarm_stream":
                streams = Servicer(config, handler, None).streams()

                async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    await streams.serve(reader, writer, caller="dial", via="tcp")

                listener = await asyncio.start_server(serve, HOST, 0)
                stack.push_async_callback(listener.wait_closed)
                stack.callback(listener.close)
                port = listener.sockets[0].getsockname()[1]
            else:
                server = await stack.enter_async_context(PeerServer.start(config, handler))
                port = server.port
            conn.send(("addr", port))
            conn.send(("ready", info))
            while True:
                msg = await recv()
                if msg[0] == "go":
                    before = _usage()
                    async with asyncio.timeout(_round_timeout(a.num_bytes)):
                        await handler.received.wait()
                    handler.received.clear()
                    done = {"t_done": handler.t_done, "tensor_s": handler.tensor_s}
                    conn.send(("done", done | _usage_since(before)))
                    _between_rounds(a)
                elif msg[0] == "check":
                    conn.send(("check", {"mean_crc": zlib.crc32(handler.x.numpy().data)}))
                elif msg[0] == "stop":
                    return
                else:
                    raise RuntimeError(f"unexpected message {msg[0]!r}")

    port = await recv()
    assert port[0] == "addr"
    address: str | StreamRoute = f"{HOST}:{port[1]}"
    if a.method == "locoswarm_stream":

        async def open_stream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
            reader, writer = await asyncio.open_connection(HOST, port[1])
            return reader, writer, "tcp"

        address = StreamRoute("tcp", open_stream)
    client = PeerClient(config, peer_id="dial")
    try:
        conn.send(("ready", info))
        while True:
            msg = await recv()
            if msg[0] == "go":
                await _asleep_until(msg[1])
                before = _usage()
                t_start = time.monotonic()
                out = wire(x)
                t_sent = time.monotonic()
                received = await client.exchange(
                    address, Outgoing(header=header("dial"), payload=out), view=view
                )
                t_back = time.monotonic()
                x = mean(x, received)
                t_done = time.monotonic()
                tensor_s = (t_sent - t_start) + (t_done - t_back)
                conn.send(("done", {"t_done": t_done, "tensor_s": tensor_s} | _usage_since(before)))
                _between_rounds(a)
            elif msg[0] == "check":
                conn.send(("check", {"mean_crc": zlib.crc32(x.numpy().data)}))
            elif msg[0] == "stop":
                return
            else:
                raise RuntimeError(f"unexpected message {msg[0]!r}")
    finally:
        await client.close()


def _hivemind_worker(conn: Connection, a: WorkerArgs) -> None:
    # The DHT forks its own process: create it first, before anything else starts threads.
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    initial_peers: list[str] = [] if a.role == "listen" else list(_expect(conn, "addr"))
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{HOST}/tcp/0"], initial_peers=initial_peers)
    averager = None
    try:
        if a.role == "listen":
            conn.send(("addr", [str(m) for m in dht.get_visible_maddrs()]))
        numel = a.num_bytes // 4
        x = torch.randn(numel, generator=torch.Generator().manual_seed(SEEDS[a.role]))
        timeout_s = _round_timeout(a.num_bytes)
        averager = hivemind.averaging.DecentralizedAverager(
            [x],
            dht,
            prefix="bench",
            target_group_size=2,
            min_group_size=2,
            min_matchmaking_time=HM_MIN_MATCHMAKING_S,
            request_timeout=HM_REQUEST_TIMEOUT_S,
            allreduce_timeout=timeout_s,
            start=True,
        )
        conn.send(("ready", {"torch_threads": torch.get_num_threads()}))

        def do_round(t0: float, t0_wall: float) -> dict[str, Any]:
            _sleep_until(t0)
            step = averager.step(
                scheduled_time=t0_wall + HM_MIN_MATCHMAKING_S,
                timeout=HM_STEP_TIMEOUT_S,
                wait=False,
            )
            t_began = None
            while not step.done():
                if t_began is None and (
                    step.began_allreduce
                    or step.stage.value >= AveragingStage.RUNNING_ALLREDUCE.value
                ):
                    t_began = time.monotonic()
                time.sleep(HM_POLL_S)
            t_done = time.monotonic()
            result = step.result(timeout=timeout_s)
            if result is None:
                raise RuntimeError("averager.step returned None (the round failed)")
            return {"t_done": t_done, "t_began": t_began, "group_size": len(result)}

        expected: list[torch.Tensor] = []

        def do_check() -> dict[str, Any]:
            # hivemind adds (average - local) to the local tensor, so the two sides may differ
            # in the last bit: compare with the exact mean of both initial tensors instead.
            if not expected:
                a, b = (
                    torch.randn(numel, generator=torch.Generator().manual_seed(SEEDS[r]))
                    for r in ROLES
                )
                expected.append(a.add_(b).mul_(0.5))
            with averager.get_tensors() as tensors:
                err = (tensors[0] - expected[0]).abs().max().item()
            return {"max_abs_err": float(err)}

        _serve_rounds(conn, do_round, do_check)
    finally:
        if averager is not None:
            with suppress(Exception):
                averager.shutdown()
        with suppress(Exception):
            dht.shutdown()


def _round_timeout(num_bytes: int) -> float:
    """A generous bound on one round: 60 s plus both directions at 2 MB/s."""
    return 60.0 + 2 * num_bytes / 2e6


def worker_main(a: WorkerArgs, fd: int) -> int:
    """Run one side of one method; report any failure to the parent before exiting."""
    conn = Connection(fd)
    try:
        if a.method in ("raw_tcp", "raw_tcp_tls"):
            _raw_worker(conn, a)
        elif a.method in ("locoswarm", "locoswarm_tls", "locoswarm_stream"):
            _locoswarm_worker(conn, a)
        elif a.method == "hivemind":
            _hivemind_worker(conn, a)
        else:
            raise ValueError(f"unknown method {a.method!r}")
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 1  # the parent is gone
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records it
        tb = traceback.format_exc(limit=-4)
        with suppress(OSError):
            conn.send(("error", f"{a.role}: {_describe(exc)}\n{tb}"))
        return 1
    finally:
        conn.close()
    return 0


# ----------------------------------------------------------------------------------------------
# Parent side


class WorkerFailed(RuntimeError):
    """A worker reported an error, died or did not answer in time."""


class _Worker:
    """One worker process in its own session, and the parent's end of its socket pair."""

    def __init__(self, a: WorkerArgs) -> None:
        self.name = f"{a.method}/{a.role}"
        parent_sock, child_sock = socket.socketpair()
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
        cmd = [
            sys.executable,
            "-m",
            "bench.transport",
            "--role",
            a.role,
            "--method",
            a.method,
            "--fd",
            str(child_sock.fileno()),
            "--bytes",
            str(a.num_bytes),
            "--chunk-bytes",
            str(a.chunk_bytes),
            "--allocator",
            a.allocator,
        ]
        if a.cert_dir is not None:
            cmd += ["--cert-dir", a.cert_dir]
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=root,
                env=env,
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=2,  # workers' chatter goes to our stderr
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def expect(self, kind: str, timeout_s: float) -> Any:
        """The value of the next message, which must be ``kind``; raises WorkerFailed if not."""
        # Never poll() or wait() the process here: it is reaped only in stop(), after its
        # process group has been killed, so its pid (the group id) cannot be reused before.
        if not self.conn.poll(timeout_s):
            raise WorkerFailed(f"{self.name}: no {kind!r} within {timeout_s:.0f}s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerFailed(f"{self.name}: exited before sending {kind!r}") from None
        if msg[0] == "error":
            raise WorkerFailed(f"{self.name}: {msg[1]}")
        if msg[0] != kind:
            raise WorkerFailed(f"{self.name}: expected {kind!r}, got {msg[0]!r}")
        return msg[1]

    def stop(self, grace_s: float = STOP_TIMEOUT_S) -> int | None:
        """Ask the worker to stop, then kill its whole process group (the DHT and p2pd too).

        Args:
            grace_s: How long to wait for the worker to finish on its own, twice over (for its
                cleanup, then for its exit).

        Returns:
            The worker's exit status (negative: killed by that signal), or None if it could
            not be reaped.
        """
        with suppress(OSError):
            self.conn.send(("stop",))
        # The worker closes its end last, after its own cleanup (hivemind's shutdown included).
        with suppress(EOFError, OSError):
            while self.conn.poll(grace_s):
                self.conn.recv()
        self.conn.close()
        # Let the leader exit on its own, without reaping it (WNOWAIT): while it is not reaped
        # its pid, which is the group id, cannot be reused.
        deadline = time.monotonic() + grace_s
        with suppress(ChildProcessError):
            while os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        # The group outlives its leader while any member lives: kill it either way.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class MethodResult:
    """What one method measured; ``to_dict`` is its JSON entry."""

    method: str
    num_bytes: int
    times_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    verified: bool | None = None
    error: str | None = None
    worker_pids: list[int] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def seconds(self) -> float | None:
        if self.error is not None or not self.times_s:
            return None
        return float(statistics.median(self.times_s))

    @property
    def gbps(self) -> float | None:
        s = self.seconds
        return 2 * self.num_bytes / s / 1e9 if s else None

    def medians(self) -> dict[str, float]:
        """Medians over the timed rounds of the per-round breakdowns (all-reduce, tensor ops)."""
        timed = [r for r in self.rounds if not r["warmup"]]
        keys = (
            "allreduce_s",
            "matchmaking_s",
            *(f"{r}_{k}" for r in ROLES for k in ("tensor_ops_s", "cpu_s", "minor_faults")),
        )
        return {
            k: float(statistics.median(r[k] for r in timed if k in r))
            for k in keys
            if any(k in r for r in timed)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "gbps": self.gbps,
            "times_s": self.times_s,
            "gbps_all": [2 * self.num_bytes / t / 1e9 for t in self.times_s if t > 0],
            "warmup_s": self.warmup_s,
            "medians": self.medians(),
            "error": self.error,
            "verified": self.verified,
            "includes": INCLUDES[self.method],
            "rounds": self.rounds,
            **self.info,
            "worker_pids": self.worker_pids,
            "exit_codes": self.exit_codes,
            "wall_s": self.wall_s,
        }


def _verify(method: str, check_a: dict[str, Any], check_b: dict[str, Any]) -> bool:
    if method == "hivemind":
        return bool(max(check_a["max_abs_err"], check_b["max_abs_err"]) <= HM_TOLERANCE)
    if "mean_crc" in check_a:
        # locoswarm: both sides leave with the same mean, bit for bit (a + b == b + a, and
        # halving is exact), which only holds if each received the other's bytes intact.
        return bool(check_a["mean_crc"] == check_b["mean_crc"])
    return bool(
        check_a["sent_crc"] == check_b["recv_crc"] and check_b["sent_crc"] == check_a["recv_crc"]
    )


def run_method(
    method: str,
    num_bytes: int,
    repeats: int,
    chunk_bytes: int,
    cert_dir: str | None,
    allocator: str = "node",
) -> MethodResult:
    """One warm-up and ``repeats`` timed rounds of ``method`` in a fresh pair of processes.

    Never raises for a failure of the method: it lands in ``MethodResult.error``.
    """
    started = time.perf_counter()
    res = MethodResult(method, num_bytes)
    timeout_s = _round_timeout(num_bytes)
    lead = LEAD_S.get(method, 0.05)
    workers: list[_Worker] = []
    try:
        for role in ROLES:
            workers.append(
                _Worker(WorkerArgs(method, role, num_bytes, chunk_bytes, cert_dir, allocator))
            )
            res.worker_pids.append(workers[-1].pid)
        listen, dial = workers
        dial.send("addr", listen.expect("addr", SETUP_TIMEOUT_S))
        res.info["listen"] = listen.expect("ready", SETUP_TIMEOUT_S)
        res.info["dial"] = dial.expect("ready", SETUP_TIMEOUT_S)
        for i in range(WARMUP + repeats):
            t0 = time.monotonic() + lead
            t0_wall = time.time() + (t0 - time.monotonic())
            listen.send("go", t0, t0_wall)
            dial.send("go", t0, t0_wall)
            done = {"listen": listen.expect("done", timeout_s)}
            done["dial"] = dial.expect("done", timeout_s)
            elapsed = max(d["t_done"] for d in done.values()) - t0
            rnd: dict[str, Any] = {"warmup": i < WARMUP, "seconds": elapsed}
            for role, d in done.items():
                rnd[f"{role}_done_s"] = d["t_done"] - t0
                if "tensor_s" in d:
                    rnd[f"{role}_tensor_ops_s"] = d["tensor_s"]
                for key in ("cpu_s", "minor_faults"):
                    if key in d:
                        rnd[f"{role}_{key}"] = d[key]
            if method == "hivemind":
                began = [d["t_began"] for d in done.values() if d.get("t_began") is not None]
                if began:
                    rnd["allreduce_s"] = elapsed - (min(began) - t0)
                    rnd["matchmaking_s"] = min(began) - t0
            listen.send("check")
            dial.send("check")
            ok = _verify(method, listen.expect("check", 60.0), dial.expect("check", 60.0))
            rnd["verified"] = ok
            res.verified = ok if res.verified is None else res.verified and ok
            res.rounds.append(rnd)
            (res.warmup_s if i < WARMUP else res.times_s).append(elapsed)
        if not res.verified:
            raise WorkerFailed("verification failed: see rounds[].verified")
    except Exception as exc:  # noqa: BLE001 - benchmark boundary: recorded in the JSON
        res.error = _describe(exc)
    finally:
        # Stop both sides and kill their process groups (hivemind's DHT and p2pd included).
        grace = STOP_TIMEOUT_S if res.error is None else FAILED_STOP_S
        res.exit_codes = {w.name: w.stop(grace) for w in workers}
    res.wall_s = time.perf_counter() - started
    return res


# ----------------------------------------------------------------------------------------------
# Summary, plot, table


def _figure(results: dict[str, MethodResult], method: str, what: str) -> float | None:
    r = results.get(method)
    if r is None:
        return None
    return r.seconds if what == "seconds" else r.gbps


def _why(results: dict[str, MethodResult], method: str) -> str:
    r = results.get(method)
    if r is None:
        return f"{method} was not measured"
    return f"{method} failed: {r.error}" if r.error else f"{method} has no timed round"


def summarise(results: dict[str, MethodResult]) -> dict[str, Any]:
    """The ratios and the target checks; a check is None (with a note) when a figure is missing.

    Args:
        results: Per-method results keyed by method name.

    Returns:
        ``{"ratios": {...}, "checks": {...}, "check_notes": {...}}``.
    """
    ratios: dict[str, float | None] = {}
    checks: dict[str, bool | None] = {}
    notes: dict[str, str] = {}

    def ratio(name: str, num: tuple[str, str], den: tuple[str, str]) -> float | None:
        a, b = _figure(results, *num), _figure(results, *den)
        value = a / b if a is not None and b else None
        ratios[name] = value
        if value is None:
            notes[name] = "; ".join(
                _why(results, m) for m, v in ((num[0], a), (den[0], b)) if not v
            )
        return value

    def check(name: str, value: float | None, ok: bool, source: str) -> None:
        checks[name] = ok if value is not None else None
        if value is None:
            notes[name] = notes.get(source, "a figure is missing")

    hm = ratio("hivemind_s_over_locoswarm_s", ("hivemind", "seconds"), ("locoswarm", "seconds"))
    check(
        f"hivemind_s / locoswarm_s >= {HIVEMIND_SPEEDUP:g}",
        hm,
        hm is not None and hm >= HIVEMIND_SPEEDUP,
        "hivemind_s_over_locoswarm_s",
    )
    raw = ratio("locoswarm_gbps_over_raw_tcp_gbps", ("locoswarm", "gbps"), ("raw_tcp", "gbps"))
    check(
        f"locoswarm throughput / raw TCP throughput >= {RAW_FRACTION:g}",
        raw,
        raw is not None and raw >= RAW_FRACTION,
        "locoswarm_gbps_over_raw_tcp_gbps",
    )
    tls = ratio(
        "locoswarm_tls_gbps_over_locoswarm_gbps", ("locoswarm_tls", "gbps"), ("locoswarm", "gbps")
    )
    cost = 1 - tls if tls is not None else None
    ratios["locoswarm_tls_cost"] = cost
    if cost is None:
        notes["locoswarm_tls_cost"] = notes["locoswarm_tls_gbps_over_locoswarm_gbps"]
    check(
        f"TLS cost 1 - locoswarm_tls / locoswarm throughput <= {TLS_COST_MAX:g}",
        cost,
        cost is not None and cost <= TLS_COST_MAX,
        "locoswarm_tls_gbps_over_locoswarm_gbps",
    )
    # For information: the same figures against the TLS baselines.
    ratio("hivemind_s_over_locoswarm_tls_s", ("hivemind", "seconds"), ("locoswarm_tls", "seconds"))
    ratio(
        "hivemind_s_over_locoswarm_stream_s",
        ("hivemind", "seconds"),
        ("locoswarm_stream", "seconds"),
    )
    ratio(
        "locoswarm_stream_gbps_over_raw_tcp_gbps",
        ("locoswarm_stream", "gbps"),
        ("raw_tcp", "gbps"),
    )
    ratio(
        "locoswarm_tls_gbps_over_raw_tcp_tls_gbps",
        ("locoswarm_tls", "gbps"),
        ("raw_tcp_tls", "gbps"),
    )
    raw_tls = ratio(
        "raw_tcp_tls_gbps_over_raw_tcp_gbps", ("raw_tcp_tls", "gbps"), ("raw_tcp", "gbps")
    )
    ratios["raw_tcp_tls_cost"] = 1 - raw_tls if raw_tls is not None else None
    return {"ratios": ratios, "checks": checks, "check_notes": notes}


def plot(results: dict[str, MethodResult], summary: dict[str, Any], path: Path) -> None:
    """Bars of median seconds per method (log scale), every timed round as a dot, ratios noted.

    Args:
        results: Per-method results.
        summary: ``summarise(results)``.
        path: Where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    colors = {
        "raw_tcp": "tab:gray",
        "raw_tcp_tls": "silver",
        "locoswarm": "tab:blue",
        "locoswarm_tls": "lightsteelblue",
        "locoswarm_stream": "tab:cyan",
        "hivemind": "tab:red",
    }
    fig, ax = plt.subplots(figsize=(10, 5.5))
    values = [r.seconds for r in results.values() if r.seconds]
    floor = min(values) / 3 if values else 1e-3
    for i, m in enumerate(methods):
        r = results[m]
        if r.seconds is None:
            ax.text(i, floor * 1.2, "failed", ha="center", va="bottom", rotation=90, fontsize=9)
            continue
        ax.bar(i, r.seconds, 0.6, color=colors.get(m, "tab:green"))
        ax.scatter([i] * len(r.times_s), r.times_s, color="k", s=10, zorder=3)
        allreduce = r.medians().get("allreduce_s")
        if allreduce is not None:
            ax.hlines(allreduce, i - 0.3, i + 0.3, colors="k", linestyles="--")
            ax.annotate(
                f"all-reduce {allreduce:.3g} s",
                (i, allreduce),
                textcoords="offset points",
                xytext=(0, -12),
                ha="center",
                fontsize=8,
            )
        ax.annotate(
            f"{r.seconds:.3g} s\n{r.gbps:.3g} GB/s",
            (i, r.seconds),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_yscale("log")
    top = max(values) if values else 1.0
    ax.set_ylim(floor, top * 6)
    ax.set_xticks(range(len(methods)), methods)
    size = next(iter(results.values())).num_bytes if results else 0
    ax.set(
        ylabel="seconds per swap (median; dots: every round)",
        title=f"two-way swap of {size / 1e6:g} MB each way on {HOST}",
    )
    ax.grid(alpha=0.3, axis="y")
    ratios, checks = summary["ratios"], summary["checks"]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    marks = ["n/a" if ok is None else ("met" if ok else "MISSED") for ok in checks.values()]
    lines = [
        f"hivemind / locoswarm time: {fmt(ratios['hivemind_s_over_locoswarm_s'], '.2f')}x "
        f"(target >= {HIVEMIND_SPEEDUP:g}: {marks[0]})",
        f"locoswarm / raw TCP throughput: {fmt(ratios['locoswarm_gbps_over_raw_tcp_gbps'], '.2f')}"
        f" (target >= {RAW_FRACTION:g}: {marks[1]})",
        f"TLS cost: {fmt(ratios['locoswarm_tls_cost'], '.2f')} "
        f"(target <= {TLS_COST_MAX:g}: {marks[2]})",
    ]
    ax.text(
        0.01,
        0.98,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash padded to the spec's width when value is None."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(value, spec)


def print_table(results: dict[str, MethodResult], summary: dict[str, Any]) -> None:
    """Seconds, GB/s and notes per method, then the ratios and checks, on stderr."""
    print(f"{'method':14s} {'median s':>9s} {'GB/s':>7s} {'wall s':>7s}  notes", file=sys.stderr)
    for m, r in results.items():
        notes = [f"times {', '.join(f'{t:.3f}' for t in r.times_s)}"] if r.times_s else []
        med = r.medians()
        if "allreduce_s" in med:
            notes.append(f"all-reduce {med['allreduce_s']:.3f}s")
        if "dial_tensor_ops_s" in med:
            notes.append(
                f"torch ops listen {med['listen_tensor_ops_s']:.3f}s dial "
                f"{med['dial_tensor_ops_s']:.3f}s"
            )
        if r.error:
            notes.append(r.error.splitlines()[0][:160])
        print(
            f"{m:14s} {_fmt(r.seconds, '9.3f')} {_fmt(r.gbps, '7.3f')} {r.wall_s:7.1f}  "
            f"{'; '.join(notes)}",
            file=sys.stderr,
        )
    for name, value in summary["ratios"].items():
        print(f"  {name} = {_fmt(value, '.3f')}", file=sys.stderr)
    print_checks(summary["checks"], summary["check_notes"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--role``, one side of one method). Returns the exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_BYTES:,} bytes, 1 repeat")
    p.add_argument("--json", default=None, help="where to write the JSON results (required)")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--bytes", type=int, default=None, help="override the payload size per side")
    p.add_argument("--repeats", type=int, default=None, help="override the timed repeats")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="locoswarm chunk size")
    p.add_argument(
        "--allocator",
        choices=("node", "glibc"),
        default="node",
        help="node: locoswarm workers use a node's C allocator settings (default); glibc: none",
    )
    p.add_argument("--note", default=None, help="free text kept in the JSON header")
    # One side of one method, started by the benchmark itself.
    p.add_argument("--role", choices=ROLES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cert-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    num_bytes = a.bytes or (QUICK_BYTES if a.quick else FULL_BYTES)
    if num_bytes <= 0 or num_bytes % 4:
        p.error("--bytes must be a positive multiple of 4 (fp32 elements)")
    if a.role is not None:
        if a.method is None or a.fd is None:
            p.error("--role needs --method and --fd")
        return worker_main(
            WorkerArgs(a.method, a.role, num_bytes, a.chunk_bytes, a.cert_dir, a.allocator), a.fd
        )
    if a.json is None:
        p.error("--json is required")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    repeats = a.repeats or (QUICK_REPEATS if a.quick else FULL_REPEATS)

    print(
        f"transport benchmark ({'quick' if a.quick else 'full'}): {num_bytes:,} bytes each way, "
        f"{WARMUP} warm-up + {repeats} timed rounds, methods {', '.join(methods)}, "
        f"load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[str, MethodResult] = {}
    with tempfile.TemporaryDirectory(prefix="locoswarm-bench-tls-") as tmp:
        make_certs(Path(tmp))
        for m in methods:
            r = run_method(m, num_bytes, repeats, a.chunk_bytes, tmp, a.allocator)
            results[m] = r
            print(
                f"  {m}: {_fmt(r.seconds, '.3f')} s, {_fmt(r.gbps, '.3f')} GB/s "
                f"in {r.wall_s:.1f}s{' ERROR ' + r.error.splitlines()[0] if r.error else ''}",
                file=sys.stderr,
                flush=True,
            )
    summary = summarise(results)
    out = {
        "header": {
            "mode": "quick" if a.quick else "full",
            "bytes": num_bytes,
            "numel_fp32": num_bytes // 4,
            "repeats": repeats,
            "warmup": WARMUP,
            "seconds": "median of the timed rounds; a round runs from the 'go' instant t0 "
            "(shared monotonic clock) to both sides holding the other's complete payload",
            "gb_per_s": "2 * bytes / seconds / 1e9: bytes moved in both directions, GB = 1e9 B",
            "includes": {m: INCLUDES[m] for m in methods},
            "process_layout": "a fresh pair of processes per method (python -m bench.transport "
            "--role listen|dial), each in its own session; the listening side binds port 0",
            "host": HOST,
            "chunk_bytes": a.chunk_bytes,
            "allocator": {
                "node": "locoswarm workers apply a node's C allocator settings "
                "(node.allocator.tune_for: TrainerConfig's defaults) and hand the "
                "heaps' free memory back after each round, outside the timing, as a node does",
                "glibc": "every worker keeps glibc's allocator defaults",
            }[a.allocator],
            "raw_recv_bytes": RAW_RECV_BYTES,
            "tls_send_bytes": TLS_SEND_BYTES,
            "tls": "throw-away EC P-256 CA and server certificate (SAN IP:127.0.0.1, "
            "DNS:localhost), CA-verified by the dialling side",
            "hivemind_averager": {
                "target_group_size": 2,
                "min_group_size": 2,
                "min_matchmaking_time": HM_MIN_MATCHMAKING_S,
                "request_timeout": HM_REQUEST_TIMEOUT_S,
                "step_timeout": HM_STEP_TIMEOUT_S,
                "part_size_bytes": "hivemind default (2**19)",
                "compression": "none",
                "scheduled_time": "t0 + min_matchmaking_time, the same for both sides",
            },
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio_version": _version("grpcio"),
            "hivemind_version": _version("hivemind"),
            "torch_version": _version("torch"),
            "cryptography_version": _version("cryptography"),
            "uvloop_version": _version("uvloop"),
            "ssl": ssl.OPENSSL_VERSION,
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": source("locoswarm/protocol", "protocol"),
            "note": a.note,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "results": {m: r.to_dict() for m, r in results.items()},
        **summary,
        "wall_s": time.perf_counter() - started,
    }
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(out), indent=1, default=str))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(results, summary, png)
    print_table(results, summary)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
