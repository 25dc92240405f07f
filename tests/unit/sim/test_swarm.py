"""The in-process swarm: each strategy's bytes and invariants, the daemon's grouping rules,
overlap, determinism and fault modelling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch

from locoswarm.compression.sideinfo import siq_bytes
from locoswarm.errors import ConfigError
from locoswarm.peers.pairing import round_groups
from locoswarm.sim.config import NetworkModel, SimConfig
from locoswarm.sim.swarm import EvalPoint, Swarm, run_sim
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.tasks.task import TaskConfig

TASK = TaskConfig(name="tiny", batch_size=2, seq_len=16, val_batches=1, max_bytes=50_000)
DILOCO_FP32 = replace(default_round_config("diloco"), bits=32, momentum_bits=32)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(strategy: str, **kw: object) -> SimConfig:
    base: dict[str, object] = {
        "strategy": strategy,
        "num_replicas": 4,
        "rounds": 3,
        "inner_steps": 2,
        "task": TASK,
    }
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


def _fp32(swarm: Swarm) -> int:
    """Bytes of one fp32 copy of the model."""
    return swarm.num_parameters * 4


def _phis(swarm: Swarm) -> list[torch.Tensor]:
    return [rep.state.phi for rep in swarm.replicas]


def _groups(swarm: Swarm, r: int) -> list[tuple[int, ...]]:
    """Round ``r``'s groups as the daemon computes them (no replica missing)."""
    cfg = swarm.cfg
    index = {rep.peer_id: i for i, rep in enumerate(swarm.replicas)}
    size = cfg.group_size or cfg.num_replicas
    return [
        tuple(sorted(index[p] for p in g))
        for g in round_groups(list(index), cfg.run_id, r, size, cfg.schedule)
    ]


def _same_phi_exactly_within(swarm: Swarm, groups: Sequence[tuple[int, ...]]) -> None:
    """Members of a group hold bit-identical phi; members of different groups do not."""
    phis = _phis(swarm)
    where = {i: g for g in groups for i in g}
    for i in range(len(phis)):
        for j in range(i + 1, len(phis)):
            assert torch.equal(phis[i], phis[j]) == (where[i] == where[j]), (i, j, groups)


def test_solo_sends_nothing_and_replicas_drift_apart() -> None:
    result = run_sim(_cfg("solo")).to_dict()["final"]
    assert result["bytes_sent_per_replica"] == [0.0] * 4
    assert result["bytes_received_per_replica"] == [0.0] * 4
    assert result["spread"] > 0
    assert all(f == 0.0 for f in result["idle_fraction_per_replica"])


def test_ddp_keeps_replicas_identical_and_counts_ring_allreduce_bytes() -> None:
    swarm = Swarm(_cfg("ddp"))
    result = swarm.run().to_dict()["final"]
    assert result["spread"] == 0.0
    per_step = 2 * 3 / 4 * _fp32(swarm)
    assert result["bytes_sent_per_replica"] == [pytest.approx(6 * per_step)] * 4


def test_noloco_pairs_swap_one_fp32_tensor_per_round() -> None:
    swarm = Swarm(_cfg("noloco"))
    result = swarm.run().to_dict()
    assert result["final"]["bytes_sent_per_replica"] == [3.0 * _fp32(swarm)] * 4
    assert result["final"]["bytes_received_per_replica"] == [3.0 * _fp32(swarm)] * 4
    curve = result["curve"]
    assert [p["inner_step"] for p in curve] == [2, 4, 6]
    assert [p["round"] for p in curve] == [1, 2, 3]


def test_noloco_general_gamma_sends_theta_and_phi() -> None:
    sync = RoundConfig(mode="noloco", lr=0.7, momentum=0.5, gamma=1.0)
    swarm = Swarm(_cfg("noloco", sync=sync))
    result = swarm.run().to_dict()["final"]
    assert result["bytes_sent_per_replica"] == [3.0 * 2 * _fp32(swarm)] * 4


def test_odd_replica_count_leaves_exactly_one_replica_alone_per_round() -> None:
    """Five replicas in pairs: the daemon's rule leaves the odd one out to a solo step."""
    rounds = 3
    swarm = Swarm(_cfg("noloco", num_replicas=5, rounds=rounds))
    sent = swarm.run().to_dict()["final"]["bytes_sent_per_replica"]
    tensor = _fp32(swarm)
    # Each replica sent one tensor in each round it was paired, none in the others ...
    assert all(s % tensor == 0 for s in sent)
    # ... and every round paired exactly four of the five.
    assert sum(sent) == rounds * 4 * tensor
    assert sent != [sent[0]] * 5  # somebody was alone
    alone = [sum(1 for g in _groups(swarm, r) if len(g) == 1) for r in range(rounds)]
    assert alone == [1] * rounds


def test_diloco_pairs_leave_each_round_with_bit_identical_phi() -> None:
    swarm = Swarm(_cfg("diloco", num_replicas=6, overlap=False))
    seen: list[int] = []

    def check(point: EvalPoint) -> None:
        _same_phi_exactly_within(swarm, _groups(swarm, point.round - 1))
        seen.append(point.round)

    result = swarm.run(check).to_dict()["final"]
    assert seen == [1, 2, 3]
    assert result["spread"] > 0  # pairs agree, the swarm as a whole does not (yet)


def test_group_size_zero_averages_over_every_replica() -> None:
    """The all-reduce reference: one group of all five replicas, one identical phi."""
    swarm = Swarm(_cfg("diloco", num_replicas=5, group_size=0, sync=DILOCO_FP32))
    result = swarm.run().to_dict()["final"]
    phis = _phis(swarm)
    assert all(torch.equal(p, phis[0]) for p in phis[1:])
    assert result["spread"] == 0.0
    # Counted as a ring all-reduce of one fp32 tensor per round.
    per_round = 2 * 4 / 5 * _fp32(swarm)
    assert result["bytes_sent_per_replica"] == [pytest.approx(3 * per_round)] * 5


def test_groups_other_than_pairs_need_fp32_proposals() -> None:
    with pytest.raises(ConfigError, match="bits 32"):
        _cfg("diloco", group_size=0)  # the daemon's default diloco sends 16-bit proposals
    _cfg("diloco", group_size=4, sync=DILOCO_FP32)


def test_hypercube_pairs_partner_i_xor_two_to_the_round() -> None:
    swarm = Swarm(_cfg("diloco", num_replicas=8, pairing="hypercube", overlap=False))
    rounds: list[int] = []

    def check(point: EvalPoint) -> None:
        r = point.round - 1
        bit = 1 << (r % 3)
        pairs = [(i, i ^ bit) for i in range(8) if i < i ^ bit]
        assert _groups(swarm, r) == pairs
        _same_phi_exactly_within(swarm, pairs)
        rounds.append(r)

    swarm.run(check)
    assert rounds == [0, 1, 2]


def test_hypercube_averages_eight_replicas_exactly_in_three_rounds() -> None:
    """With outer lr 1 and no momentum a proposal is theta, so a round averages the pair: three
    rounds along the cube's three dimensions give every replica the same global mean."""
    # Clipping off: random thetas are far apart, and this is about the averaging itself.
    sync = replace(DILOCO_FP32, lr=1.0, momentum=0.0, share_momentum=False, clip=False)
    swarm = Swarm(_cfg("diloco", num_replicas=8, pairing="hypercube", overlap=False, sync=sync))
    n = swarm.num_parameters
    thetas = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    mean = torch.stack(thetas).double().mean(dim=0).float()
    current = thetas
    for r in range(3):
        swarm.outer_round(r, current, _groups(swarm, r))
        current = [p.clone() for p in _phis(swarm)]
    phis = _phis(swarm)
    assert all(torch.equal(p, phis[0]) for p in phis[1:])
    torch.testing.assert_close(phis[0], mean, rtol=0, atol=1e-6)
    # Random pairs do not get there in three rounds.
    rand = Swarm(_cfg("diloco", num_replicas=8, pairing="random", overlap=False, sync=sync))
    current = thetas
    for r in range(3):
        rand.outer_round(r, current, _groups(rand, r))
        current = [p.clone() for p in _phis(rand)]
    assert not all(torch.equal(p, _phis(rand)[0]) for p in _phis(rand)[1:])


def test_overlap_applies_the_update_a_phase_late() -> None:
    overlapped = Swarm(_cfg("diloco"))
    overlapped.run()
    blocking = Swarm(_cfg("diloco", overlap=False))
    blocking.run()
    for a, b in zip(_phis(overlapped), _phis(blocking), strict=True):
        assert not torch.equal(a, b)
    # Blocking: the model is phi at the round's end. Overlap: the model still trains on the
    # update it has not applied yet, so it differs from phi.
    for rep in blocking.replicas:
        assert torch.equal(torch.cat([p.detach().flatten() for p in rep.model.parameters()]),
                           rep.state.phi)  # fmt: skip
    for rep in overlapped.replicas:
        assert rep.pending is not None
        assert not torch.equal(
            torch.cat([p.detach().flatten() for p in rep.model.parameters()]), rep.state.phi
        )


def _run_phis(**kw: object) -> list[torch.Tensor]:
    swarm = Swarm(_cfg("diloco", inner_steps=4, **kw))
    swarm.run()
    return _phis(swarm)


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_apply_delay_changes_when_the_update_lands() -> None:
    runs = {d: _run_phis(apply_delay=d) for d in (0, 1, 4)}
    assert not _same(runs[0], runs[1])
    assert not _same(runs[1], runs[4])
    assert not _same(runs[0], runs[4])


def test_default_apply_delay_is_the_modelled_latency_in_steps() -> None:
    """None models the daemon: an update lands once the exchange is over, ceil(transfer time /
    step time) steps into the next phase; here latency only (bandwidth unlimited)."""
    net = NetworkModel(step_time_s=0.1, latency_s=0.25, bandwidth_bytes_per_s=1e18)
    modelled = _run_phis(network=net)  # 2.5 steps: the update lands after 3
    assert _same(modelled, _run_phis(network=net, apply_delay=3))
    assert not _same(modelled, _run_phis(network=net, apply_delay=2))


def test_default_apply_delay_counts_the_bytes_over_the_bandwidth() -> None:
    probe = Swarm(_cfg("diloco", inner_steps=4))
    rc, n = default_round_config("diloco"), probe.num_parameters
    # The message: a quantized proposal and shared momentum.
    size = siq_bytes(n, rc.bits, rc.block_size) + siq_bytes(n, rc.momentum_bits, rc.block_size)
    # Latency 0 and a link that takes 1.5 step times for the message: it lands after 2 steps.
    net = NetworkModel(step_time_s=0.1, latency_s=0.0, bandwidth_bytes_per_s=size / 0.15)
    modelled = _run_phis(network=net)
    assert _same(modelled, _run_phis(network=net, apply_delay=2))
    assert not _same(modelled, _run_phis(network=net, apply_delay=1))


def test_default_apply_delay_is_at_most_the_phase() -> None:
    net = NetworkModel(step_time_s=0.1, latency_s=60.0)
    assert _same(_run_phis(network=net), _run_phis(network=net, apply_delay=4))


def test_a_solo_step_lands_at_once() -> None:
    """A replica alone (here: the only one) applies its own update before the next step."""
    net = NetworkModel(step_time_s=0.1, latency_s=60.0)  # an exchange would land late
    alone = _run_phis(num_replicas=1, network=net)
    assert _same(alone, _run_phis(num_replicas=1, network=net, apply_delay=0))
    assert not _same(alone, _run_phis(num_replicas=1, network=net, apply_delay=1))


@pytest.mark.parametrize("strategy", ["diloco", "ef", "noloco"])
def test_outer_rounds_replay_bit_for_bit(strategy: str) -> None:
    cfg = _cfg(strategy, miss_prob=0.3)
    a, b = Swarm(cfg), Swarm(cfg)
    ra, rb = a.run().to_dict(), b.run().to_dict()
    for pa, pb in zip(_phis(a), _phis(b), strict=True):
        assert torch.equal(pa, pb)
    assert ra["curve"] == rb["curve"]
    assert ra["final"]["bytes_sent_per_replica"] == rb["final"]["bytes_sent_per_replica"]
    other = Swarm(replace(cfg, seed=1))
    other.run()
    assert not torch.equal(_phis(other)[0], _phis(a)[0])


def test_the_same_outer_round_twice_gives_the_same_bits() -> None:
    """``Swarm.outer_round`` on the same thetas and states: identical messages and phis."""
    cfg = _cfg("ef", overlap=False)
    a, b = Swarm(cfg), Swarm(cfg)
    n = a.num_parameters
    base = a.replicas[0].state.phi
    thetas = [base - 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(i))
              for i in range(4)]  # fmt: skip
    groups = _groups(a, 0)
    ma = a.outer_round(0, thetas, groups)
    mb = b.outer_round(0, thetas, groups)
    assert [p.payload for m in ma.values() for p in m.parts] == [
        p.payload for m in mb.values() for p in m.parts
    ]
    for pa, pb in zip(_phis(a), _phis(b), strict=True):
        assert torch.equal(pa, pb)


def test_missed_rounds_are_counted_and_cost_no_bytes() -> None:
    swarm = Swarm(_cfg("noloco", rounds=6, miss_prob=0.5))
    result = swarm.run().to_dict()["final"]
    missed = result["rounds_missed_per_replica"]
    assert sum(missed) > 0
    for sent, m in zip(result["bytes_sent_per_replica"], missed, strict=True):
        assert sent <= (6 - m) * _fp32(swarm)


def test_a_slow_replica_stalls_all_reduce_more_than_pairs() -> None:
    net = NetworkModel(speeds=(1.0, 1.0, 1.0, 0.25), latency_s=0.0)
    every = run_sim(_cfg("diloco", network=net, group_size=0, sync=DILOCO_FP32)).to_dict()
    pairs = run_sim(_cfg("diloco", network=net)).to_dict()
    every_idle = every["final"]["idle_fraction_per_replica"]
    pairs_idle = pairs["final"]["idle_fraction_per_replica"]
    # All-reduce: every fast replica waits for the slow one each round; pairs: only its partner.
    assert sum(pairs_idle[:3]) < sum(every_idle[:3])
    assert every_idle[3] < every_idle[0]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        _cfg("allreduce")
    with pytest.raises(ConfigError, match="speeds"):
        _cfg("noloco", network=NetworkModel(speeds=(1.0, 2.0)))
    with pytest.raises(ConfigError, match="miss_prob"):
        replace(_cfg("noloco"), miss_prob=1.5)
    with pytest.raises(ConfigError, match="group_size"):
        _cfg("noloco", group_size=1)
    with pytest.raises(ConfigError, match="hypercube"):
        _cfg("diloco", group_size=4, pairing="hypercube", sync=DILOCO_FP32)
    with pytest.raises(ConfigError, match="differs from strategy"):
        _cfg("ef", sync=default_round_config("diloco"))
    with pytest.raises(ConfigError, match="apply_delay"):
        _cfg("noloco", apply_delay=3)
    with pytest.raises(ConfigError, match="apply_delay"):
        _cfg("noloco", apply_delay=-1)
    _cfg("noloco", apply_delay=0)  # the update lands before the first step
    with pytest.raises(ConfigError, match="inner_steps"):
        _cfg("noloco", inner_steps=0)
