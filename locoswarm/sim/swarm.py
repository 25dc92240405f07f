"""An in-process swarm of N replicas of a task, driving the daemon's round algorithm.

Strategies: ``ddp`` (gradients averaged every step, the quality ceiling), ``diloco``, ``noloco``,
``ef`` and ``solo`` (no communication). The three sync modes run ``sync/rounds.py``, the code the
daemon runs, and are scheduled as the daemon schedules them: the daemon's pairing (a seeded
shuffle cut into groups, the odd one out alone; or the hypercube), messages encoded and decoded
through the real codecs, and each round's update applied one phase late (overlap) or at once
(blocking). Counts the bytes each replica puts on the wire, models replicas of different speeds and
replicas that miss a round, and records validation loss, the loss of the replica-averaged model
and the spread of weights across replicas. Knows nothing about sockets, the DHT or gRPC: the
network is a model (``clock.py``).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from locoswarm.peers.pairing import round_groups
from locoswarm.sim.clock import SimClock
from locoswarm.sim.config import SimConfig
from locoswarm.sync import rounds
from locoswarm.sync.robust import Clipper, poison
from locoswarm.sync.round_config import RoundConfig
from locoswarm.sync.rounds import Message, OuterState
from locoswarm.tasks.inner import InnerConfig, InnerLoop, add_difference, flat_params, set_flat
from locoswarm.tasks.task import ReplicaTask, TaskFactory


@dataclass(frozen=True, slots=True)
class EvalPoint:
    """Swarm quality after ``inner_step`` inner steps (``round`` outer rounds)."""

    round: int
    inner_step: int
    val_loss_mean: float
    """Mean of the per-replica validation losses (the NoLoCo paper's metric)."""
    val_loss_avg_model: float
    """Validation loss of the model whose weights are the mean of all replicas'."""
    spread: float
    """RMS deviation of the replicas' weights from their mean (NL-train eval_weight_variance)."""
    train_loss_mean: float
    """Mean training loss over the last round, averaged over replicas."""
    bytes_sent_mean: float
    """Bytes sent so far, averaged over replicas."""
    sim_time_s: float
    """Simulated wall clock of the slowest replica."""


@dataclass(slots=True)
class SimResult:
    """Everything a run measured; ``to_dict`` is what ``--json`` writes."""

    config: dict[str, Any]
    num_parameters: int
    curve: list[EvalPoint] = field(default_factory=list)
    val_loss_per_replica: list[float] = field(default_factory=list)
    bytes_sent_per_replica: list[float] = field(default_factory=list)
    bytes_received_per_replica: list[float] = field(default_factory=list)
    idle_fraction_per_replica: list[float] = field(default_factory=list)
    rounds_missed_per_replica: list[int] = field(default_factory=list)
    tokens_per_replica: int = 0
    wrapped_blocks: int = 0
    clipped_per_replica: list[int] = field(default_factory=list)
    """Partner tensors each replica clipped (``sync/robust.py``)."""
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        final = self.curve[-1]
        return {
            "config": self.config,
            "num_parameters": self.num_parameters,
            "final": {
                "val_loss_mean": final.val_loss_mean,
                "val_loss_avg_model": final.val_loss_avg_model,
                "spread": final.spread,
                "val_loss_per_replica": self.val_loss_per_replica,
                "bytes_sent_per_replica": self.bytes_sent_per_replica,
                "bytes_received_per_replica": self.bytes_received_per_replica,
                "bytes_sent_mean": final.bytes_sent_mean,
                "idle_fraction_per_replica": self.idle_fraction_per_replica,
                "rounds_missed_per_replica": self.rounds_missed_per_replica,
                "sim_time_s": final.sim_time_s,
                "tokens_per_replica": self.tokens_per_replica,
                "wrapped_blocks": self.wrapped_blocks,
                "clipped_per_replica": self.clipped_per_replica,
            },
            "curve": [asdict(p) for p in self.curve],
            "wall_s": self.wall_s,
        }


class Replica:
    """One simulated node: model, inner loop, data, outer state and the update it owes itself."""

    def __init__(
        self, peer_id: str, task: ReplicaTask, inner: InnerConfig, total_steps: int | None
    ) -> None:
        self.peer_id = peer_id
        self.task = task
        self.model = task.model
        self.loop = InnerLoop(self.model, inner, total_steps)
        self.state = OuterState(phi=flat_params(self.model))
        self.pending: tuple[Tensor, Tensor] | None = None
        """(phi_{r+1}, theta_r): the last round's update, not applied yet (overlap)."""
        self.delay = 0
        """Steps of the next phase run before ``pending`` lands (overlap)."""
        self.losses: list[float] = []
        self.clipper: Clipper | None = None
        """Pairs: clips partners' messages (the daemon's ``OuterStep`` keeps one too)."""
        self.clipped = 0
        """Partner tensors clipped so far."""
        self.bytes_sent = 0.0
        self.bytes_received = 0.0
        self.missed = 0

    def train(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            self.losses.append(self.loop.step(self.task.loss(self.model, next(self.task.batches))))

    def apply_pending(self) -> None:
        """theta += phi_{r+1} - theta_r: the daemon trainer's overlapped apply."""
        if self.pending is not None:
            add_difference(self.model, *self.pending)
            self.pending = None

    def phase(self, h: int, *, overlap: bool, delay: int) -> Tensor:
        """One inner phase; returns the snapshot theta at its boundary. With overlap the last
        round's update lands after ``delay`` steps (the daemon trainer's rule)."""
        if overlap and self.pending is not None:
            self.train(delay)
            self.apply_pending()
            self.train(h - delay)
        else:
            self.train(h)
        return flat_params(self.model)

    def finish(self, new: OuterState, theta: Tensor, *, overlap: bool) -> None:
        self.state = new
        if overlap:
            self.pending = (new.phi, theta)
        else:
            set_flat(self.model, new.phi)


RoundHook = Callable[[int, dict[str, Message]], None]


class Swarm:
    """N replicas trained under one strategy; ``run`` drives the whole simulation."""

    def __init__(self, cfg: SimConfig, replicas: Sequence[Replica] | None = None) -> None:
        self.cfg = cfg
        n = cfg.num_replicas
        if replicas is None:
            factory = TaskFactory(cfg.task)
            torch.manual_seed(cfg.seed)
            tasks = [factory.build(replica=i, num_replicas=n, seed=cfg.seed) for i in range(n)]
            # Every replica starts from the same weights (as nodes of one run do).
            init = tasks[0].model.state_dict()
            for t in tasks[1:]:
                t.model.load_state_dict(init)
            replicas = [
                Replica(f"replica-{i:03d}", t, cfg.inner, cfg.total_steps)
                for i, t in enumerate(tasks)
            ]
        self.replicas = list(replicas)
        self.rc: RoundConfig | None = cfg.round_config
        if self.rc is not None:
            for rep in self.replicas:
                rep.clipper = Clipper(self.rc)
        self.num_parameters = int(self.replicas[0].state.phi.numel())
        self.clock = SimClock(n, cfg.network)
        self._fault_rng = random.Random(f"miss/{cfg.seed}")
        self._scratch = copy.deepcopy(self.replicas[0].model)
        self._tensor_bytes = self.num_parameters * 4
        self.wrapped_blocks = 0
        """Side-information blocks whose checksum failed (decoded out of reach)."""

    def run(self, on_eval: Callable[[EvalPoint], None] | None = None) -> SimResult:
        cfg = self.cfg
        started = time.perf_counter()
        result = SimResult(config=_config_dict(cfg), num_parameters=self.num_parameters)
        for r in range(cfg.rounds):
            if cfg.strategy == "ddp":
                self._ddp_round()
            else:
                thetas = [
                    rep.phase(cfg.h, overlap=cfg.overlap, delay=rep.delay) for rep in self.replicas
                ]
                for i in range(cfg.num_replicas):
                    self.clock.compute(i, cfg.h)
                if self.rc is None:  # solo: the model is its own outer weights
                    for rep, theta in zip(self.replicas, thetas, strict=True):
                        rep.state = OuterState(phi=theta)
                else:
                    self.outer_round(r, thetas, self._groups(r))
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
                point = self._evaluate(r + 1)
                result.curve.append(point)
                if on_eval is not None:
                    on_eval(point)
        n = cfg.num_replicas
        result.val_loss_per_replica = [self._replica_loss(rep) for rep in self.replicas]
        result.bytes_sent_per_replica = [rep.bytes_sent for rep in self.replicas]
        result.bytes_received_per_replica = [rep.bytes_received for rep in self.replicas]
        result.idle_fraction_per_replica = [self.clock.idle_fraction(i) for i in range(n)]
        result.rounds_missed_per_replica = [rep.missed for rep in self.replicas]
        result.wrapped_blocks = self.wrapped_blocks
        result.clipped_per_replica = [rep.clipped for rep in self.replicas]
        result.tokens_per_replica = cfg.total_steps * cfg.task.batch_size * cfg.task.seq_len
        result.wall_s = time.perf_counter() - started
        return result

    # -- rounds ------------------------------------------------------------------------------

    def _groups(self, r: int) -> list[tuple[int, ...]]:
        """This round's groups of replica indices; replicas that miss the round stand alone."""
        cfg = self.cfg
        present = [i for i in range(cfg.num_replicas) if self._fault_rng.random() >= cfg.miss_prob]
        for i in set(range(cfg.num_replicas)) - set(present):
            self.replicas[i].missed += 1
        index = {self.replicas[i].peer_id: i for i in present}
        size = cfg.group_size or max(2, len(present))
        groups = [
            tuple(sorted(index[p] for p in g))
            for g in round_groups(list(index), cfg.run_id, r, size, cfg.schedule)
        ]
        return groups + [(i,) for i in range(cfg.num_replicas) if i not in present]

    def outer_round(
        self,
        r: int,
        thetas: Sequence[Tensor],
        groups: Sequence[Sequence[int]],
        labels: Sequence[int] | None = None,
    ) -> dict[int, Message]:
        """Every replica's message for round ``r``, then every group's exchange (members in id
        order); a group of one takes the solo step. Returns the messages."""
        rc = self.rc
        assert rc is not None
        labels = labels or [r] * len(self.replicas)
        messages = {
            i: rounds.prepare(rc, rep.state, thetas[i], round=labels[i])
            for i, rep in enumerate(self.replicas)
            if any(i in g for g in groups)
        }
        wire = dict(messages)
        if self.cfg.attack is not None:  # bad replicas send poisoned weights, keep their own
            for i in set(self.cfg.attackers) & set(messages):
                bad = poison(thetas[i], self.cfg.attack, self.cfg.attack_factor, seed=r * 1009 + i)
                wire[i] = rounds.prepare(rc, self.replicas[i].state, bad, round=labels[i])
        for group in groups:
            self.exchange(group, messages, thetas, wire)
        return messages

    def exchange(
        self,
        group: Sequence[int],
        messages: dict[int, Message],
        thetas: Sequence[Tensor],
        wire: dict[int, Message] | None = None,
    ) -> None:
        """One group's exchange, as each member's daemon computes it. ``wire``: what each
        member sends, where it differs from its own message (a bad replica)."""
        wire = messages if wire is None else wire
        rc = self.rc
        assert rc is not None
        if len(group) == 1:
            i = group[0]
            rep = self.replicas[i]
            rep.finish(
                rounds.alone(rc, rep.state, messages[i]), thetas[i], overlap=self.cfg.overlap
            )
            rep.delay = 0 if self.cfg.apply_delay is None else self.cfg.apply_delay
            return
        new: dict[int, OuterState] = {}
        shares = None
        if self.cfg.tokens:  # weighted by the tokens each member trained, as the daemon does
            weights = [self.cfg.tokens[j] for j in group]
            shares = rounds.member_shares(weights, rc.max_weight_ratio)
        for i in group:
            rep = self.replicas[i]
            members = []
            for j in group:
                if j == i:
                    members.append(messages[i].own)
                    continue
                partner = rounds.read(rc, messages[i], wire[j].parts)
                self.wrapped_blocks += partner.wrapped_blocks
                tensors = partner.tensors
                if len(group) == 2 and rep.clipper is not None:
                    tensors, clips = rep.clipper.clip(messages[i].own, tensors, rep.state.phi)
                    rep.clipped += sum(c.clipped for c in clips)
                members.append(tensors)
            mean = rounds.member_mean(members, shares)
            spread = rounds.spread_of(shares, list(group).index(i))
            new[i] = rounds.combine(rc, rep.state, messages[i], mean, spread=spread)
        k = len(group)
        net = self.cfg.network
        for i in group:
            rep = self.replicas[i]
            rep.finish(new[i], thetas[i], overlap=self.cfg.overlap)
            # The update lands once the exchange is over: the modelled transfer time in steps.
            transfer = (k - 1) * net.latency_s + messages[i].num_bytes * max(1, k - 1) / (
                net.bandwidth_bytes_per_s
            )
            modelled = math.ceil(transfer / self.clock.step_time_s[i] - 1e-9)
            given = self.cfg.apply_delay
            rep.delay = min(self.cfg.h, modelled if given is None else given)
            size = messages[i].num_bytes
            if self.cfg.group_size == 0:  # the reference: a ring all-reduce of one fp32 tensor
                sent = received = 2 * (k - 1) / k * self._tensor_bytes
            elif k == 2:
                sent, received = size, messages[group[1] if i == group[0] else group[0]].num_bytes
            else:  # reduce-scatter + all-gather over pairwise exchanges
                sent = received = 2 * (k - 1) / k * size
            rep.bytes_sent += sent
            rep.bytes_received += received
        hops = 1 if k == 2 else 2 * (k - 1)
        self.clock.sync(
            group, bytes_per_member=max(m.num_bytes for m in messages.values()), hops=hops
        )

    def _ddp_round(self) -> None:
        """H steps of data-parallel training: every step averages all replicas' gradients."""
        n = self.cfg.num_replicas
        lead = self.replicas[0]
        lead.model.train()
        # Ring all-reduce of the gradient: 2(n-1)/n of its size each way, 2(n-1) hops.
        per_step = 2 * (n - 1) / n * self._tensor_bytes
        for _ in range(self.cfg.h):
            losses = [rep.task.loss(lead.model, next(rep.task.batches)) for rep in self.replicas]
            lead.losses.append(lead.loop.step(torch.stack(losses).mean()))
            for i, rep in enumerate(self.replicas):
                self.clock.compute(i, 1)
                rep.bytes_sent += per_step
                rep.bytes_received += per_step
            self.clock.sync(range(n), bytes_per_member=per_step, hops=2 * (n - 1))
        theta = flat_params(lead.model)
        for rep in self.replicas:
            rep.state = OuterState(phi=theta)

    # -- evaluation --------------------------------------------------------------------------

    def _replica_loss(self, rep: Replica) -> float:
        """Validation loss of a replica's outer weights (the model a node keeps)."""
        set_flat(self._scratch, rep.state.phi)
        return rep.task.validation_loss(self._scratch)

    def _evaluate(self, rounds_done: int) -> EvalPoint:
        phis = torch.stack([rep.state.phi for rep in self.replicas])
        mean = phis.mean(dim=0)
        spread = float(((phis - mean) ** 2).mean().sqrt())
        task0 = self.replicas[0].task
        if self.cfg.strategy == "ddp":
            per_replica = [self._replica_loss(self.replicas[0])] * len(self.replicas)
        else:
            per_replica = [self._replica_loss(rep) for rep in self.replicas]
        set_flat(self._scratch, mean)
        h = self.cfg.h
        recent = [
            sum(rep.losses[-h:]) / len(rep.losses[-h:]) for rep in self.replicas if rep.losses
        ]
        sent = [rep.bytes_sent for rep in self.replicas]
        return EvalPoint(
            round=rounds_done,
            inner_step=rounds_done * h,
            val_loss_mean=sum(per_replica) / len(per_replica),
            val_loss_avg_model=task0.validation_loss(self._scratch),
            spread=spread,
            train_loss_mean=sum(recent) / len(recent) if recent else math.nan,
            bytes_sent_mean=sum(sent) / len(sent),
            sim_time_s=max(self.clock.now_s),
        )


def _config_dict(cfg: SimConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["inner_steps"] = cfg.h
    out["total_inner_steps"] = cfg.total_steps
    return out


def run_sim(cfg: SimConfig, on_eval: Callable[[EvalPoint], None] | None = None) -> SimResult:
    """Builds the swarm described by ``cfg``, runs it to the end and returns what it measured."""
    return Swarm(cfg).run(on_eval)
