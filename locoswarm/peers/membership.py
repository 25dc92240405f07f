"""Swarm membership in the hivemind DHT: publish, refresh and withdraw our record; list others.

hivemind's ``DHT`` runs in a forked process (with its ``p2pd``); start it before any gRPC object
exists. Every call here awaits an MPFuture (``return_future=True``), so the event loop never
blocks. Our record is signed with the node's identity key (``identity.py``): it is stored under a
subkey that carries the public key, so every node's DHT refuses a change the key did not sign,
and a record is read only from a signed subkey whose key derives the record's peer id; then
``records.parse_record`` checks it. Knows nothing of gRPC or tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shlex
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from locoswarm.errors import ConfigError, PeerUnavailable
from locoswarm.peers.config import PeersConfig
from locoswarm.peers.identity import IdentityError, load_identity, record_subkey, subkey_owner
from locoswarm.peers.records import PeerRecord, parse_record

log = logging.getLogger(__name__)


def _relay_discovery_off_with_trusted_relays() -> None:
    """p2pd's ``-relayDiscovery`` (on by default) is no ``P2P.create`` argument: where trusted
    relays are given, turn it off, or p2pd spends its time looking for other relays and makes no
    reservation with ours (measured in network namespaces: none within 30 s). Installed once."""
    make = P2P._make_process_args
    if getattr(make, "locoswarm", False):
        return

    def make_args(*args: Any, **kwargs: Any) -> list[str]:
        if "trustedRelays" in kwargs:
            kwargs.setdefault("relayDiscovery", False)
        return list(make(*args, **kwargs))

    make_args.locoswarm = True  # type: ignore[attr-defined]
    P2P._make_process_args = staticmethod(make_args)


def nat_options(config: PeersConfig) -> dict[str, Any]:
    """What a node that cannot be dialled asks of its libp2p daemon: a relay reservation with
    the peers it joins through (so peers reach it relayed, then hole-punched), and private
    reachability at once instead of after AutoNAT's probes."""
    if not (config.client_mode and config.initial_peers):
        return {}
    return {
        "use_relay": True,
        "use_auto_relay": True,
        "force_reachability": "private",
        "trusted_relays": list(config.initial_peers),
    }


def _start_dht(
    config: PeersConfig, identity: Path, validator: RSASignatureValidator, *, fresh: bool
) -> hivemind.DHT:
    """Start the DHT process, retrying an unreachable bootstrap a bounded number of times."""
    last: BaseException | None = None
    _relay_discovery_off_with_trusted_relays()
    for attempt in range(1, config.bootstrap_attempts + 1):
        dht = None
        # hivemind forks the DHT process while gRPC and torch threads run: a garbage collection in
        # the child that walks objects another thread was changing at the fork crashed it
        # (SIGSEGV under the test suite's load). Frozen objects are never walked by the child.
        gc.freeze()
        try:
            dht = hivemind.DHT(
                initial_peers=list(config.initial_peers),
                start=True,
                host_maddrs=list(config.host_maddrs),
                announce_maddrs=list(config.announce_maddrs) or None,
                identity_path=str(identity),
                # A key made a moment ago is nobody else's: skip p2pd's check for a twin.
                check_if_identity_free=not fresh,
                record_validators=[validator],
                client_mode=config.client_mode,
                **nat_options(config),
                bootstrap_timeout=config.bootstrap_timeout_s,
                ensure_bootstrap_success=bool(config.initial_peers),
                await_ready=True,
            )
            return dht
        except Exception as exc:  # noqa: BLE001 - hivemind raises plain exceptions on bootstrap
            last = exc
            if dht is not None:
                dht.shutdown()
            log.warning(
                "DHT bootstrap attempt %d/%d failed: %s", attempt, config.bootstrap_attempts, exc
            )
            if attempt < config.bootstrap_attempts:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))  # in a worker thread, not the loop
        finally:
            gc.unfreeze()
    addresses = ", ".join(config.initial_peers) or "(none)"
    raise PeerUnavailable(
        None,
        f"cannot join the swarm through {addresses} after {config.bootstrap_attempts} attempts: "
        f"{last}",
        reason="bootstrap",
    )


@dataclass
class Membership:
    """A started DHT plus our record in it. Create with ``async with Membership.start(...)``."""

    config: PeersConfig
    dht: hivemind.DHT
    validator: RSASignatureValidator
    """Signs our record (its subkey carries our public key; every node's DHT checks it)."""
    record: PeerRecord | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    """Records from the DHT that failed validation, counted by reason."""
    _expiry: float = 0.0
    _p2p: P2P | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, config: PeersConfig) -> AsyncIterator[Membership]:
        """Start the DHT (in a thread: it forks and may block), yield, then withdraw and stop."""
        if not config.initial_peers:
            log.info("no --join address given: starting a new swarm")
        with tempfile.TemporaryDirectory(prefix="locoswarm-identity-") as scratch:
            # Without an identity file, a key for this run only (deleted when it stops).
            path = config.identity_path or Path(scratch) / "identity.key"
            fresh = not path.exists()
            try:
                key = await asyncio.to_thread(load_identity, path)
            except (IdentityError, OSError) as exc:
                raise ConfigError(f"peers.identity_path: {exc}") from None
            validator = RSASignatureValidator(key)
            dht = await asyncio.to_thread(_start_dht, config, path, validator, fresh=fresh)
            membership = cls(config=config, dht=dht, validator=validator)
            try:
                yield membership
            finally:
                try:
                    await membership.withdraw()
                finally:
                    if membership._p2p is not None:
                        await membership._p2p.shutdown()  # a replica: closes our client only
                    await asyncio.to_thread(dht.shutdown)

    @property
    def dht_peer_id(self) -> str:
        return str(self.dht.peer_id)

    async def p2p(self) -> P2P:
        """The DHT's libp2p daemon, from this process (made once; the daemon address is asked
        of the DHT process in a thread, so the loop never blocks)."""
        if self._p2p is None:
            maddr = await asyncio.to_thread(
                self.dht.run_coroutine,
                hivemind.DHT._get_p2p_daemon_listen_maddr,  # what dht.replicate_p2p() asks
            )
            self._p2p = await P2P.replicate(maddr)
        return self._p2p

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other nodes can join through."""
        return [str(m) for m in self.dht.get_visible_maddrs(latest=True)]

    def join_command(self, program: str = "locoswarm run") -> str:
        """The exact command line that joins this node's swarm."""
        addrs = [
            m for m in self.visible_maddrs() if "/127.0.0.1/" not in m
        ] or self.visible_maddrs()
        args = " ".join(shlex.quote(m) for m in addrs)
        return f"{program} --run-id {shlex.quote(self.config.run_id)} --join {args}"

    async def announce(self, record: PeerRecord) -> bool:
        """Publish (or refresh) our record; it expires ``record_ttl_s`` from now."""
        self.record = record
        self._expiry = get_dht_time() + self.config.record_ttl_s
        stored = await self.dht.store(
            self.config.records_key,
            record.to_wire(),
            self._expiry,
            subkey=record_subkey(record.peer_id, self.validator),
            return_future=True,
        )
        return bool(stored)

    async def withdraw(self) -> None:
        """Replace our record with a tombstone that outlives it (the DHT keeps the later expiry)."""
        if self.record is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.dht.store(
                    self.config.records_key,
                    None,
                    max(self._expiry, get_dht_time()) + 1.0,
                    subkey=record_subkey(self.record.peer_id, self.validator),
                    return_future=True,
                ),
                timeout=self.config.bootstrap_timeout_s,
            )
        self.record = None

    async def refresh_forever(self) -> None:
        """Re-publish our record every ``refresh_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            if self.record is not None:
                try:
                    await self.announce(self.record)
                except Exception as exc:  # noqa: BLE001 - task boundary: keep refreshing
                    log.warning("could not refresh our DHT record: %s", exc)

    async def list_peers(self) -> list[PeerRecord]:
        """Live records of the run (ours included), validated; withdrawn and bad ones dropped."""
        found: Any = await self.dht.get(self.config.records_key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        records = []
        for subkey, item in found.value.items():
            if getattr(item, "expiration_time", 0.0) < now:
                continue
            owner, why = subkey_owner(subkey)
            if owner is None:
                self.dropped[why] = self.dropped.get(why, 0) + 1
                continue
            record, why = parse_record(owner, getattr(item, "value", None))
            if record is None:
                if why != "withdrawn":
                    self.dropped[why] = self.dropped.get(why, 0) + 1
                continue
            records.append(record)
        return records


def check_join_addresses(addresses: tuple[str, ...]) -> None:
    """Refuse malformed multiaddrs at startup, naming the bad one."""
    from hivemind.utils.multiaddr import Multiaddr

    for address in addresses:
        try:
            Multiaddr(address)
        except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
            raise ConfigError(f"--join {address!r} is not a multiaddr: {exc}") from None
        if "/p2p/" not in address:
            raise ConfigError(f"--join {address!r} lacks the /p2p/<peer id> part")
