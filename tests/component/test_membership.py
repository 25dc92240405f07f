"""Membership on real hivemind DHTs on 127.0.0.1: join by one address, expiry, rejoin, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time

from locoswarm.errors import ConfigError, PeerUnavailable
from locoswarm.node import processes as procs
from locoswarm.peers import PeerRecord, PeersConfig
from locoswarm.peers.identity import load_identity, peer_id_of, record_subkey
from locoswarm.peers.membership import Membership, check_join_addresses

pytestmark = pytest.mark.timeout(120)

TTL_S = 3.0


def config(initial: tuple[str, ...] = (), **kw: object) -> PeersConfig:
    fields: dict[str, object] = {
        "run_id": "membership-test",
        "initial_peers": initial,
        "host_maddrs": ("/ip4/127.0.0.1/tcp/0",),
        "record_ttl_s": TTL_S,
        "refresh_interval_s": 1.0,
        "bootstrap_timeout_s": 5.0,
        "bootstrap_attempts": 2,
    }
    fields.update(kw)
    return PeersConfig(**fields)  # type: ignore[arg-type]


def record(member: Membership, step: int = 0) -> PeerRecord:
    """A member's record: its peer id is the one its identity key derives (a record naming any
    other is dropped by every reader)."""
    return PeerRecord(
        peer_id=member.dht_peer_id,
        address=f"127.0.0.1:{50000 + step}",
        outer_step=step,
        model_fingerprint="fp",
        sync="noloco",
        version="test",
    )


async def seen_ids(member: Membership) -> set[str]:
    return {r.peer_id for r in await member.list_peers()}


async def wait_for(predicate, timeout_s: float) -> float:
    """Poll an async predicate; return how long it took (fails the test past ``timeout_s``)."""
    start = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling the DHT is the point
            await asyncio.sleep(0.1)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def swarm(n: int) -> AsyncIterator[list[Membership]]:
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Membership.start(config()))
        members = [first]
        join = tuple(first.visible_maddrs())
        for _ in range(n - 1):
            members.append(await stack.enter_async_context(Membership.start(config(join))))
        yield members


async def test_eight_nodes_join_through_one_address_and_see_each_other() -> None:
    p2pd_before = procs.named("p2pd", below=os.getpid())
    start = time.monotonic()
    async with swarm(8) as members:
        joined_s = time.monotonic() - start
        for member in members:
            assert await member.announce(record(member))
        everyone = {m.dht_peer_id for m in members}

        async def all_see_all() -> bool:
            views = await asyncio.gather(*(seen_ids(m) for m in members))
            return all(v == everyone for v in views)

        seen_s = await wait_for(all_see_all, 30)
        print(
            json.dumps(
                {"nodes": 8, "join_s": round(joined_s, 2), "all_records_s": round(seen_s, 2)}
            )
        )
        assert (
            members[3].join_command().startswith("locoswarm run --run-id membership-test --join ")
        )
    assert procs.wait_gone(procs.named("p2pd", below=os.getpid()) - p2pd_before) == set()


async def test_a_killed_nodes_record_expires_and_a_restarted_node_rejoins() -> None:
    async with swarm(3) as members:
        for member in members:
            await member.announce(record(member))
        refreshers = [asyncio.create_task(m.refresh_forever()) for m in members[:2]]
        victim_id = members[2].dht_peer_id
        try:
            await wait_for(lambda: _has(members[0], victim_id, True), 15)
            victim = members[2].dht.pid
            procs.kill_tree(victim)  # SIGKILL: no withdrawal, the record must expire on its own
            gone_s = await wait_for(lambda: _has(members[0], victim_id, False), TTL_S + 10)
            assert gone_s <= TTL_S + 2.0
            # The survivors still see each other.
            assert await _has(members[1], members[0].dht_peer_id, True)
            join = tuple(members[0].visible_maddrs())
            async with Membership.start(config(join)) as again:
                await again.announce(record(again, step=7))
                await wait_for(lambda: _has(members[1], again.dht_peer_id, True), 15)
                assert {
                    r.outer_step
                    for r in await members[1].list_peers()
                    if r.peer_id == again.dht_peer_id
                } == {7}
        finally:
            for task in refreshers:
                task.cancel()
            await asyncio.gather(*refreshers, return_exceptions=True)


async def _has(member: Membership, peer: str, present: bool) -> bool:
    return (peer in await seen_ids(member)) == present


async def test_a_clean_shutdown_withdraws_the_record() -> None:
    async with Membership.start(config()) as first:
        await first.announce(record(first))
        async with Membership.start(config(tuple(first.visible_maddrs()))) as second:
            await second.announce(record(second))
            second_id = second.dht_peer_id
            await wait_for(lambda: _has(first, second_id, True), 15)
        assert second_id not in await seen_ids(first)  # withdrawn at once, not after the TTL


async def test_bad_records_from_the_dht_are_dropped_with_a_reason() -> None:
    async with Membership.start(config()) as member:
        await member.announce(record(member))
        key = member.config.records_key
        own = record_subkey(member.dht_peer_id, member.validator)
        # Under our own signed subkey (we hold the key), so only the record's content is bad.
        for bad in ({"peer_id": "x"}, [1, 2], dict(record(member).to_wire(), outer_step=-1)):
            await member.dht.store(key, bad, get_dht_time() + 30, subkey=own, return_future=True)
            assert await seen_ids(member) == set()
        assert sum(member.dropped.values()) == 3


async def test_records_only_their_owner_can_write() -> None:
    async with swarm(2) as (owner, attacker):
        await owner.announce(record(owner))
        await attacker.announce(record(attacker))
        key = owner.config.records_key
        owners_subkey = record_subkey(owner.dht_peer_id, owner.validator)
        forged = dict(record(owner).to_wire(), address="203.0.113.9:1", outer_step=999)
        later = get_dht_time() + 60

        async def store(value: object, subkey: object) -> bool:
            return bool(
                await attacker.dht.store(key, value, later, subkey=subkey, return_future=True)
            )

        # Overwrite or withdraw the owner's record: unsigned for that key, refused by every DHT.
        assert not await store(forged, owners_subkey)
        assert not await store(None, owners_subkey)
        # The owner's peer id under the attacker's own (validly signed) key, or with no key:
        # stored, but no reader takes it.
        assert await store(forged, record_subkey(owner.dht_peer_id, attacker.validator))
        assert await store(forged, owner.dht_peer_id)
        for reader in (owner, attacker):
            records = {r.peer_id: r for r in await reader.list_peers()}
            assert set(records) == {owner.dht_peer_id, attacker.dht_peer_id}
            assert records[owner.dht_peer_id].outer_step == 0
            assert records[owner.dht_peer_id].address == "127.0.0.1:50000"
            assert reader.dropped == {
                "record subkey names a peer id its owner key does not derive": 1,
                "unsigned record (its subkey names no owner key)": 1,
            }


async def test_the_record_key_is_the_p2p_identity(tmp_path: Path) -> None:
    path = tmp_path / "id" / "identity.key"
    async with Membership.start(config(identity_path=path)) as first:
        assert peer_id_of(load_identity(path)) == first.dht_peer_id
        peer = first.dht_peer_id
    async with Membership.start(config(identity_path=path)) as again:  # restart: same id
        assert again.dht_peer_id == peer
    path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=r"peers.identity_path: identity file .* not a libp2p"):
        async with Membership.start(config(identity_path=path)):
            pass


async def test_an_unreachable_bootstrap_is_a_clear_error_naming_the_address() -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWFkJQuGvmedvQYJeG2j5h23QAyTydWcx5txxJddkQXx97"
    p2pd_before = procs.named("p2pd", below=os.getpid())
    with pytest.raises(PeerUnavailable, match="tcp/9/p2p") as info:
        async with Membership.start(config((dead,), bootstrap_timeout_s=2.0)):
            pass
    assert "2 attempts" in str(info.value)
    assert procs.wait_gone(procs.named("p2pd", below=os.getpid()) - p2pd_before) == set()


def test_malformed_join_addresses_are_refused() -> None:
    with pytest.raises(ConfigError, match="not a multiaddr"):
        check_join_addresses(("127.0.0.1:31337",))
    with pytest.raises(ConfigError, match="/p2p/"):
        check_join_addresses(("/ip4/127.0.0.1/tcp/31337",))


CHILD = """
import asyncio, sys
from locoswarm.peers import PeersConfig
from locoswarm.peers.membership import Membership
async def main():
    cfg = PeersConfig(run_id="orphans", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    async with Membership.start(cfg) as m:
        print(m.dht.pid, flush=True)
        await asyncio.sleep(120)
asyncio.run(main())
"""


def test_killing_the_process_group_leaves_no_dht_or_p2pd_behind() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None
        dht_pid = int(child.stdout.readline())
        group = procs.in_group(child.pid)
        assert dht_pid in group
        assert len(group) >= 3  # node, DHT process, p2pd
        os.killpg(child.pid, signal.SIGKILL)  # what `KillMode=mixed`/a test teardown does
        child.wait(timeout=10)
        assert procs.wait_gone(group) == set()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
