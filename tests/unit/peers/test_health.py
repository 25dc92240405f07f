"""Peer health over an injected clock: backoff grows with consecutive failures only, a success
forgives, violations ban; and the matchmaker reports successes as well as failures."""

from __future__ import annotations

from locoswarm.errors import PeerUnavailable
from locoswarm.peers import Matchmaker, PeerHealth, PeerRecord, PeersConfig

CFG = PeersConfig(run_id="t", backoff_base_s=1.0, backoff_max_s=300.0, ban_after_violations=3)


def test_backoff_doubles_with_consecutive_failures_up_to_the_maximum() -> None:
    health = PeerHealth(CFG)
    waits = [health.failed("p", now=0.0) for _ in range(10)]
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert waits[-1] == 300.0
    assert health.available("p", 299.0)[0] is False
    assert health.available("p", 300.0)[0] is True


def test_a_success_resets_the_backoff() -> None:
    health = PeerHealth(CFG)
    for _ in range(7):
        health.failed("p", now=0.0)
    health.succeeded("p")
    assert health.available("p", 0.0) == (True, "ok")
    # The next transient error costs the base backoff again, not the maximum.
    assert health.failed("p", now=1000.0) == 1001.0


def test_repeated_violations_ban_until_the_ban_ends() -> None:
    health = PeerHealth(CFG)
    assert [health.violated("p", now=float(t)) for t in range(3)] == [False, False, True]
    ok, why = health.available("p", 10.0)
    assert not ok
    assert "banned" in why
    assert health.available("p", 2.0 + CFG.ban_s)[0] is True


def record(peer: str) -> PeerRecord:
    return PeerRecord(
        peer_id=peer,
        address=f"127.0.0.1:{1000 + int(peer[1:])}",
        outer_step=0,
        model_fingerprint="fp",
        sync="noloco",
        version="t",
    )


async def test_the_matchmaker_forgives_a_peer_after_a_successful_exchange() -> None:
    now = [0.0]
    health = PeerHealth(CFG)
    mm = Matchmaker[str](CFG, "a0", health=health, clock=lambda: now[0])
    view = [record("a0"), record("b1")]
    outcomes: list[str | Exception] = [PeerUnavailable("b1", "down")] * 7
    outcomes += ["session", PeerUnavailable("b1", "x")]
    given = iter(outcomes)

    async def propose(peer: str, step: int) -> str | None:
        got = next(given)
        if isinstance(got, Exception):
            raise got
        return got

    for step in range(7):  # seven failures in a row: the next would back off 128 s
        now[0] = step * 1000.0
        match = await mm.match(record("a0"), view, propose, deadline_s=0.05)
        assert match.role == "solo"
    now[0] = 10_000.0
    match = await mm.match(record("a0"), view, propose, deadline_s=0.05)
    assert match.role == "dialler"
    assert match.partners == ("b1",)
    now[0] = 20_000.0
    match = await mm.match(record("a0"), view, propose, deadline_s=0.05)
    assert match.role == "solo"
    # The success in between forgave the seven: one new failure costs the base backoff only.
    assert health.available("b1", now[0] + CFG.backoff_base_s) == (True, "ok")
