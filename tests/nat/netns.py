"""A NAT topology built from Linux network namespaces, for tests that need real NAT traversal.

Layout (every address lives inside namespaces this module creates; none of them is linked to the
host's own network, so no packet can leave them)::

    {p}-pub    bridge br0, 11.0.0.1/24: the "public internet" segment; the bootstrap/relay runs here
    {p}-pubN   eth0 11.0.0.(10+N)/24 on br0: extra public peers with distinct IPs (N = 1..4)
    {p}-ra     wan 11.0.0.101/24 on br0, lan 10.1.1.1/24: NAT router of A
    {p}-a      eth0 10.1.1.2/24, default via 10.1.1.1: host A behind NAT
    {p}-rb     wan 11.0.0.102/24 on br0, lan 10.2.2.1/24: NAT router of B
    {p}-b      eth0 10.2.2.2/24, default via 10.2.2.1: host B behind NAT

The public segment uses 11.0.0.0/24 on purpose: libp2p treats private and TEST-NET addresses as
non-public, and then neither hole punching nor autorelay behave as they do on the internet.

Each router masquerades what leaves through ``wan`` and DROPs (never rejects) every packet that
arrives on ``wan`` without conntrack state, like a home NAT: outbound connections work, unsolicited
inbound ones vanish.

Processes run through ``ip netns exec`` in their own session (process group); teardown sends
SIGTERM to each, SIGKILLs the groups after a grace period, then whatever still runs inside the
namespaces, then deletes the namespaces. Namespaces left by a killed run (owner pid gone) are
removed by the next ``setup()``.

Usage::

    with NatTopology() as topo:                      # or the ``topo`` fixture of test_netns_p2p
        peers = topo.start_public_peers(tmp_path)    # bare p2pd on 11.0.0.11..14, for hole punching
        proc = topo.popen(topo.nat_a_ns, [sys.executable, "-m", "locoswarm", "run", ...],
                          env=env, stdout=log_file)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
IPTABLES = "/usr/sbin/iptables" if os.path.exists("/usr/sbin/iptables") else "iptables"
NS_PREFIX = "lsnat"  # every namespace this module makes starts with it, then the owner's pid
_COUNTER = itertools.count()
_CMD_TIMEOUT_S = 15.0

PUBLIC_SUBNET = "11.0.0.0/24"
PUBLIC_HUB_IP = "11.0.0.1"
PUBLIC_PEER_PORT = 4001


def p2pd_binary() -> Path:
    """hivemind's bundled p2pd, found without importing hivemind (which takes seconds)."""
    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.origin is None:
        raise RuntimeError("hivemind is not installed")
    return Path(spec.origin).parent / "hivemind_cli" / "p2pd"


def _run(argv: Sequence[str], timeout: float = _CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _check(argv: Sequence[str]) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


@functools.cache
def netns_available() -> str | None:
    """None when this machine can build a NatTopology, else why not (a pytest skip reason)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which(IP) is None:
        return "iproute2 `ip` is not installed"
    if shutil.which(IPTABLES) is None:
        return "iptables is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}probe"
    try:
        add = _run([IP, "netns", "add", probe])
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns add` failed: {e}"
    if add.returncode != 0:
        return f"`ip netns add` failed: {add.stderr.strip()}"
    try:
        for argv in (
            [IP, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            [IP, "-n", probe, "link", "add", "br0", "type", "bridge"],
            [IP, "netns", "exec", probe, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            [IP, "netns", "exec", probe, IPTABLES, "-t", "nat", "-A", "POSTROUTING",
             "-o", "p0", "-j", "MASQUERADE"],
            [IP, "netns", "exec", probe, IPTABLES, "-A", "FORWARD", "-i", "p0", "-m", "conntrack",
             "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"],
        ):  # fmt: skip
            try:
                proc = _run(argv)
            except (OSError, subprocess.SubprocessError) as e:
                return f"{' '.join(argv[4:])} failed: {e}"
            if proc.returncode != 0:
                return f"`{' '.join(argv)}` failed: {proc.stderr.strip()}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run([IP, "netns", "del", probe])
    return None


@dataclass(frozen=True)
class NatSide:
    """One NATed host and its router."""

    router_ns: str
    host_ns: str
    wan_ip: str  # the router's public address: what the host's peers observe
    lan_ip: str  # the router's LAN address, the host's default gateway
    host_ip: str
    lan_prefix: int = 24


@dataclass
class _Started:
    proc: subprocess.Popen[bytes]
    ns: str
    argv: list[str]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    proc = _run([IP, "netns", "list"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL whatever still runs inside ``ns`` (a namespace this module made)."""
    proc = _run([IP, "netns", "pids", ns])
    for token in proc.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(token), signal.SIGKILL)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier runs of this module whose owner process is gone."""
    removed = []
    for ns in list_namespaces():
        if not ns.startswith(NS_PREFIX):
            continue
        digits = "".join(itertools.takewhile(str.isdigit, ns[len(NS_PREFIX) :]))
        if not digits or _pid_alive(int(digits)):
            continue
        _kill_inside(ns)
        _run([IP, "netns", "del", ns])
        removed.append(ns)
    return removed


@dataclass
class NatTopology:
    """Builds the namespaces on ``setup()`` (or ``with``), removes them on ``teardown()``.

    ``n_public_peers`` extra public hosts get distinct IPs 11.0.0.11, .12, ...: go-libp2p only
    trusts an observed (NATed) address once several distinct IPs reported it, and hole punching
    waits for such an address.
    """

    n_public_peers: int = 4
    prefix: str = field(default_factory=lambda: f"{NS_PREFIX}{os.getpid()}x{next(_COUNTER)}")

    public_ns: str = field(init=False)
    public_ip: str = field(init=False, default=PUBLIC_HUB_IP)
    public_peer_ns: list[str] = field(init=False)
    public_peer_ips: list[str] = field(init=False)
    side_a: NatSide = field(init=False)
    side_b: NatSide = field(init=False)
    _created: list[str] = field(init=False, default_factory=list)
    _started: list[_Started] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.n_public_peers <= 80:
            raise ValueError("n_public_peers must be within 0..80")
        p = self.prefix
        self.public_ns = f"{p}-pub"
        self.public_peer_ns = [f"{p}-pub{i}" for i in range(1, self.n_public_peers + 1)]
        self.public_peer_ips = [f"11.0.0.{10 + i}" for i in range(1, self.n_public_peers + 1)]
        self.side_a = NatSide(f"{p}-ra", f"{p}-a", "11.0.0.101", "10.1.1.1", "10.1.1.2")
        self.side_b = NatSide(f"{p}-rb", f"{p}-b", "11.0.0.102", "10.2.2.1", "10.2.2.2")

    # names used by tests
    @property
    def nat_a_ns(self) -> str:
        return self.side_a.host_ns

    @property
    def nat_b_ns(self) -> str:
        return self.side_b.host_ns

    @property
    def public_ips(self) -> list[str]:
        """Every public address a bootstrap peer may have: the hub first, then the extra peers."""
        return [self.public_ip, *self.public_peer_ips]

    @property
    def namespaces(self) -> list[str]:
        sides = [self.side_a, self.side_b]
        return [
            self.public_ns,
            *self.public_peer_ns,
            *(s.router_ns for s in sides),
            *(s.host_ns for s in sides),
        ]

    # lifecycle
    def __enter__(self) -> NatTopology:
        self.setup()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        reason = netns_available()
        if reason is not None:
            raise RuntimeError(f"cannot build a NAT topology: {reason}")
        remove_stale_namespaces()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _add_ns(self, ns: str) -> None:
        _check([IP, "netns", "add", ns])
        self._created.append(ns)
        _check([IP, "-n", ns, "link", "set", "lo", "up"])

    def _build(self) -> None:
        hub = self.public_ns
        self._add_ns(hub)
        _check([IP, "-n", hub, "link", "add", "br0", "type", "bridge"])
        _check([IP, "-n", hub, "addr", "add", f"{self.public_ip}/24", "dev", "br0"])
        _check([IP, "-n", hub, "link", "set", "br0", "up"])

        def plug(ns: str, port: str, ifname: str, cidr: str) -> None:
            """A veth from the hub's bridge (port ``port``) to ``ns`` (``ifname``, ``cidr``)."""
            veth = [IP, "-n", hub, "link", "add", port, "type", "veth"]
            _check([*veth, "peer", "name", ifname, "netns", ns])
            _check([IP, "-n", hub, "link", "set", port, "master", "br0", "up"])
            _check([IP, "-n", ns, "addr", "add", cidr, "dev", ifname])
            _check([IP, "-n", ns, "link", "set", ifname, "up"])

        for i, (ns, ip) in enumerate(zip(self.public_peer_ns, self.public_peer_ips, strict=True)):
            self._add_ns(ns)
            plug(ns, f"pp{i + 1}", "eth0", f"{ip}/24")

        for tag, side in (("a", self.side_a), ("b", self.side_b)):
            self._add_ns(side.router_ns)
            self._add_ns(side.host_ns)
            plug(side.router_ns, f"r{tag}", "wan", f"{side.wan_ip}/24")
            r, h = side.router_ns, side.host_ns
            veth = [IP, "-n", r, "link", "add", "lan", "type", "veth"]
            _check([*veth, "peer", "name", "eth0", "netns", h])
            _check([IP, "-n", r, "addr", "add", f"{side.lan_ip}/{side.lan_prefix}", "dev", "lan"])
            _check([IP, "-n", r, "link", "set", "lan", "up"])
            _check([IP, "-n", h, "addr", "add", f"{side.host_ip}/{side.lan_prefix}", "dev", "eth0"])
            _check([IP, "-n", h, "link", "set", "eth0", "up"])
            _check([IP, "-n", h, "route", "add", "default", "via", side.lan_ip])
            ipt = [IP, "netns", "exec", r, IPTABLES, "-w"]
            _check([IP, "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            _check([*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"])
            for chain in ("INPUT", "FORWARD"):
                _check([*ipt, "-A", chain, "-i", "wan", "-m", "conntrack",
                        "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"])  # fmt: skip

    # processes
    def popen(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = subprocess.STDOUT,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``ns``, in a new session: its process group holds it
        and its children (unless they make their own sessions). Killed by ``teardown()``."""
        if ns not in self._created:
            raise ValueError(f"{ns!r} is not a namespace of this topology")
        full = [IP, "netns", "exec", ns, *argv]
        proc = subprocess.Popen(
            full,
            env=dict(env) if env is not None else None,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
        self._started.append(_Started(proc, ns, list(argv)))
        return proc

    def run(
        self, ns: str, argv: Sequence[str], *, timeout: float = _CMD_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``ns`` and return its output (no check)."""
        return _run([IP, "netns", "exec", ns, *argv], timeout=timeout)

    def start_public_peers(self, workdir: Path, *, timeout_s: float = 30.0) -> list[str]:
        """Start a bare p2pd (no Python) on each public peer namespace; return their multiaddrs
        (``/ip4/11.0.0.1N/tcp/4001/p2p/<id>``) once all have printed their peer id.

        They only exist to be connected to: each one that a NATed libp2p host talks to reports,
        through identify, the address it sees (the router's WAN address). Give these maddrs to the
        NATed nodes as extra bootstrap/initial peers: hivemind's DHT pings them, fails quickly (no
        DHT handler there), and p2pd stays connected to them.
        """
        logs = []
        for i, (ns, ip) in enumerate(zip(self.public_peer_ns, self.public_peer_ips, strict=True)):
            sock = workdir / f"{self.prefix}-p2pd{i + 1}.sock"
            if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
                sock = Path("/tmp") / f"{self.prefix}-p2pd{i + 1}.sock"
            log = workdir / f"{self.prefix}-p2pd{i + 1}.log"
            argv = [
                str(p2pd_binary()),
                f"-listen=/unix{sock}",
                f"-hostAddrs=/ip4/{ip}/tcp/{PUBLIC_PEER_PORT}",
                "-forceReachabilityPublic=1",
            ]
            with open(log, "wb") as out:
                proc = self.popen(ns, argv, stdout=out)
            logs.append((proc, log, ip))
        maddrs = []
        deadline = time.monotonic() + timeout_s
        for proc, log, ip in logs:
            while True:
                ids = [
                    line.split(":", 1)[1].strip()
                    for line in read_text(log).splitlines()
                    if line.startswith("Peer ID:")
                ]
                if ids:
                    maddrs.append(f"/ip4/{ip}/tcp/{PUBLIC_PEER_PORT}/p2p/{ids[0]}")
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"p2pd on {ip} did not start:\n{read_text(log)[-2000:]}")
                time.sleep(0.05)
        return maddrs

    def stop_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every process started here (the group leader only, so that it can stop its
        children itself, e.g. hivemind its p2pd), then SIGKILL each whole process group."""
        for s in self._started:
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for s in self._started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for s in self._started:
            # the group may outlive its leader (p2pd after its Python parent): always SIGKILL it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(s.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=5)

    def teardown(self) -> None:
        try:
            self.stop_all()
        finally:
            # anything that left its process group (setsid) but still runs inside our namespaces
            for ns in reversed(self._created):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _kill_inside(ns)
            for ns in reversed(self._created):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run([IP, "netns", "del", ns])
            self._created.clear()


@contextlib.contextmanager
def nat_topology(n_public_peers: int = 4) -> Iterator[NatTopology]:
    topo = NatTopology(n_public_peers=n_public_peers)
    with topo:
        yield topo


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
