"""An in-process swarm of N replicas of a task, synchronised by the same ``sync/`` code as a node.

Strategies: ``ddp`` (gradients averaged every step, the quality ceiling), ``diloco``, ``noloco`` and
``solo`` (no communication). Counts the bytes each replica would put on the wire, models replicas of
different speeds and replicas that miss a round, and records validation loss, the loss of the
replica-averaged model and the spread of weights across replicas. Knows nothing about sockets, the
DHT or gRPC: the network is a model (``clock.py``).
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
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from locoswarm.compression import get_codec
from locoswarm.compression.error_feedback import EControl, ErrorFeedback, Pending, make_feedback
from locoswarm.sim.clock import SimClock
from locoswarm.sim.config import InnerConfig, SimConfig
from locoswarm.sync.diloco import diloco_outer_step, group_mean, outer_grad
from locoswarm.sync.noloco import noloco_outer_step
from locoswarm.sync.pairing import pairing
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
            },
            "curve": [asdict(p) for p in self.curve],
            "wall_s": self.wall_s,
        }


class _Replica:
    """One simulated node: model, inner optimizer, data, and fp32 outer state (phi, momentum)."""

    def __init__(self, task: ReplicaTask, inner: InnerConfig, total_steps: int) -> None:
        self.task = task
        self.model = task.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=inner.lr,
            betas=inner.betas,
            weight_decay=inner.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _cosine_with_warmup(inner, total_steps)
        )
        self.grad_clip = inner.grad_clip
        self.phi = self.theta()
        self.momentum: Tensor | None = None
        self.losses: list[float] = []

    def theta(self) -> Tensor:
        return parameters_to_vector(self.model.parameters()).detach().float().clone()

    def set_theta(self, flat: Tensor) -> None:
        _copy_into(self.model, flat)

    def inner_steps(self, n: int) -> None:
        self.model.train()
        for _ in range(n):
            loss = self.task.loss(self.model, next(self.task.batches))
            self.step(loss)

    def step(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.losses.append(float(loss.detach()))


@torch.no_grad()
def _copy_into(model: nn.Module, flat: Tensor) -> None:
    """Copies a flat vector into the model's parameters.

    Not ``vector_to_parameters``: that rebinds ``param.data`` to views of ``flat``, so training
    would then write through into the caller's tensor (here: the outer weights phi).
    """
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _cosine_with_warmup(inner: InnerConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < inner.warmup_steps:
            return (step + 1) / inner.warmup_steps
        progress = min(1.0, (step - inner.warmup_steps) / max(1, total_steps - inner.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return inner.min_lr_ratio + (1 - inner.min_lr_ratio) * cosine

    return factor


@torch.no_grad()
def _val_loss(task: ReplicaTask, model: nn.Module) -> float:
    if not task.val_batches:
        return math.nan
    model.eval()
    total = sum(float(task.loss(model, b)) for b in task.val_batches)
    return total / len(task.val_batches)


class Swarm:
    """N replicas trained under one strategy; ``run`` drives the whole simulation."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        factory = TaskFactory(cfg.task)
        torch.manual_seed(cfg.seed)
        n = cfg.num_replicas
        tasks = [factory.build(replica=i, num_replicas=n, seed=cfg.seed) for i in range(n)]
        # Every replica starts from the same weights (NoLoCo averages at init; DiLoCo broadcasts).
        init = tasks[0].model.state_dict()
        for t in tasks[1:]:
            t.model.load_state_dict(init)
        self.replicas = [_Replica(t, cfg.inner, cfg.total_steps) for t in tasks]
        self.num_parameters = int(self.replicas[0].phi.numel())
        self.clock = SimClock(n, cfg.network)
        self.bytes_sent = [0.0] * n
        self.bytes_received = [0.0] * n
        self.missed = [0] * n
        self._fault_rng = random.Random(f"miss/{cfg.seed}")
        self._scratch = copy.deepcopy(self.replicas[0].model)
        self._tensor_bytes = self.num_parameters * cfg.bytes_per_element
        comp = cfg.compression
        self._feedback: list[ErrorFeedback] = []
        if cfg.strategy == "ef" or (cfg.strategy == "diloco" and not comp.lossless):
            codec = get_codec(comp.codec, block_size=comp.block_size, topk_ratio=comp.topk_ratio)
            kind = "none" if comp.lossless else comp.error_feedback
            self._feedback = [make_feedback(kind, codec, eta=comp.eta) for _ in range(n)]

    def run(self, on_eval: Callable[[EvalPoint], None] | None = None) -> SimResult:
        cfg = self.cfg
        started = time.perf_counter()
        result = SimResult(config=_config_dict(cfg), num_parameters=self.num_parameters)
        for r in range(cfg.rounds):
            if cfg.strategy == "ddp":
                self._ddp_round()
            else:
                for i, rep in enumerate(self.replicas):
                    rep.inner_steps(cfg.h)
                    self.clock.compute(i, cfg.h)
                if self._feedback:
                    self._compressed_outer_step(r)
                elif cfg.strategy != "solo":
                    self._outer_step(r)
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
                point = self._evaluate(r + 1)
                result.curve.append(point)
                if on_eval is not None:
                    on_eval(point)
        n = cfg.num_replicas
        result.val_loss_per_replica = [_val_loss(rep.task, rep.model) for rep in self.replicas]
        result.bytes_sent_per_replica = list(self.bytes_sent)
        result.bytes_received_per_replica = list(self.bytes_received)
        result.idle_fraction_per_replica = [self.clock.idle_fraction(i) for i in range(n)]
        result.rounds_missed_per_replica = list(self.missed)
        result.tokens_per_replica = cfg.total_steps * cfg.task.batch_size * cfg.task.seq_len
        result.wall_s = time.perf_counter() - started
        return result

    def _ddp_round(self) -> None:
        """H steps of data-parallel training: every step averages all replicas' gradients."""
        n = self.cfg.num_replicas
        lead = self.replicas[0]
        lead.model.train()
        # Ring all-reduce of the gradient: 2(n-1)/n of its size each way, 2(n-1) hops.
        per_step = 2 * (n - 1) / n * self._tensor_bytes
        for _ in range(self.cfg.h):
            losses = [rep.task.loss(lead.model, next(rep.task.batches)) for rep in self.replicas]
            lead.step(torch.stack(losses).mean())
            for i in range(n):
                self.clock.compute(i, 1)
                self.bytes_sent[i] += per_step
                self.bytes_received[i] += per_step
            self.clock.sync(range(n), bytes_per_member=per_step, hops=2 * (n - 1))
        theta = lead.theta()
        for rep in self.replicas[1:]:
            rep.set_theta(theta)

    def _present(self) -> list[int]:
        """Replicas that take part in this round's exchange (the rest miss it)."""
        cfg = self.cfg
        present = [i for i in range(cfg.num_replicas) if self._fault_rng.random() >= cfg.miss_prob]
        for i in set(range(cfg.num_replicas)) - set(present):
            self.missed[i] += 1
        return present

    def _groups(self, r: int, present: list[int]) -> list[tuple[int, ...]]:
        """This round's groups among the present replicas: pairs for noloco (its group size) and
        ef, groups of diloco's size (default: everyone present) for diloco."""
        cfg = self.cfg
        if not present:
            return []
        if cfg.strategy == "noloco":
            size = cfg.noloco.group_size
        elif cfg.strategy == "ef":
            size = 2
        else:
            size = cfg.diloco.group_size or len(present)
        # The pairing seed counter is the inner step count at sync time, as in the reference.
        return pairing(cfg.seed, (r + 1) * cfg.h, present, group_size=size)

    def _outer_step(self, r: int) -> None:
        cfg = self.cfg
        present = self._present()
        groups = self._groups(r, present)
        groups += [(i,) for i in range(cfg.num_replicas) if i not in present]
        thetas = [rep.theta() for rep in self.replicas]
        for group in groups:
            if cfg.strategy == "noloco":
                self._noloco_group(group, thetas)
            else:
                self._diloco_group(group, thetas)
        for rep in self.replicas:
            rep.set_theta(rep.phi)  # blocking mode: theta <- phi before training on

    def _compressed_outer_step(self, r: int) -> None:
        """ef (pairs) or diloco (groups) on error-feedback-compressed pseudo-gradients.

        Each member encodes its outer gradient plus residual, the group averages the decoded
        messages in a fixed order, every member commits its residual and takes DiLoCo's outer
        step on that average (compression.md sections 3.5 and 3.7). A replica that misses the
        round aborts: its residual keeps the whole value and theta restarts from phi, so the
        progress it made reaches the swarm with its next message instead of being lost.
        """
        cfg = self.cfg
        present = self._present()
        groups = self._groups(r, present)
        pending = [
            fb.prepare("params", outer_grad(rep.phi, rep.theta()))
            for fb, rep in zip(self._feedback, self.replicas, strict=True)
        ]
        for i in set(range(cfg.num_replicas)) - set(present):
            self._feedback[i].abort(pending[i])
        for group in groups:
            for j in group:
                self._feedback[j].commit(pending[j])
            grad = group_mean([self._received(j, pending[j]) for j in group])
            sizes = [pending[j].encoded.num_bytes for j in group]
            n = len(group)
            for j, own in zip(group, sizes, strict=True):
                rep = self.replicas[j]
                rep.phi, rep.momentum = diloco_outer_step(rep.phi, grad, rep.momentum, cfg.diloco)
                sent: float
                received: float
                if cfg.strategy == "ef":  # each member sends its message to every other member
                    sent, received = (n - 1) * own, sum(sizes) - own
                else:  # compressed reduce-scatter + all-gather, as a ring
                    sent = received = 2 * (n - 1) / n * own
                self.bytes_sent[j] += sent
                self.bytes_received[j] += received
            hops = n - 1 if cfg.strategy == "ef" else 2 * (n - 1)
            self.clock.sync(group, bytes_per_member=max(sizes) * max(1, n - 1), hops=hops)
        for rep in self.replicas:
            rep.set_theta(rep.phi)

    def _received(self, j: int, pending: Pending) -> Tensor:
        """What the group averages for member j: its decoded message, or for EControl its
        updated estimator h_j (each member keeps a copy of every group member's h)."""
        fb = self._feedback[j]
        return fb.estimate[pending.key] if isinstance(fb, EControl) else pending.decoded

    def _noloco_group(self, group: Sequence[int], thetas: list[Tensor]) -> None:
        cfg = self.cfg.noloco
        members = [self.replicas[j] for j in group]
        theta_g = [thetas[j] for j in group]
        phis = None if cfg.theta_only else [m.phi for m in members]
        updates = []
        for m in members:
            delta = m.momentum if m.momentum is not None else torch.zeros_like(m.phi)
            updates.append(
                noloco_outer_step(
                    m.phi,
                    delta,
                    theta_g,
                    phis,
                    alpha=cfg.alpha,
                    beta=cfg.beta,
                    gamma=cfg.effective_gamma,
                )
            )
        for m, (phi, delta) in zip(members, updates, strict=True):
            m.phi, m.momentum = phi, delta
        tensors = 1 if cfg.theta_only else 2
        sent = (len(group) - 1) * tensors * self._tensor_bytes
        self._account(group, sent, hops=len(group) - 1)

    def _diloco_group(self, group: Sequence[int], thetas: list[Tensor]) -> None:
        cfg = self.cfg.diloco
        members = [self.replicas[j] for j in group]
        grad = group_mean(
            [outer_grad(m.phi, thetas[j]) for j, m in zip(group, members, strict=True)]
        )
        for m in members:
            m.phi, m.momentum = diloco_outer_step(m.phi, grad, m.momentum, cfg)
        n = len(group)
        self._account(group, 2 * (n - 1) / n * self._tensor_bytes, hops=2 * (n - 1))

    def _account(self, group: Sequence[int], sent: float, *, hops: int) -> None:
        for j in group:
            self.bytes_sent[j] += sent
            self.bytes_received[j] += sent
        self.clock.sync(group, bytes_per_member=sent, hops=hops)

    def _evaluate(self, rounds_done: int) -> EvalPoint:
        thetas = torch.stack([rep.theta() for rep in self.replicas])
        mean = thetas.mean(dim=0)
        spread = float(((thetas - mean) ** 2).mean().sqrt())
        task0 = self.replicas[0].task
        if self.cfg.strategy == "ddp":
            per_replica = [_val_loss(task0, self.replicas[0].model)] * len(self.replicas)
        else:
            per_replica = [_val_loss(rep.task, rep.model) for rep in self.replicas]
        _copy_into(self._scratch, mean)
        recent = [
            sum(rep.losses[-self.cfg.h :]) / max(1, len(rep.losses[-self.cfg.h :]))
            for rep in self.replicas
            if rep.losses
        ]
        return EvalPoint(
            round=rounds_done,
            inner_step=rounds_done * self.cfg.h,
            val_loss_mean=sum(per_replica) / len(per_replica),
            val_loss_avg_model=_val_loss(task0, self._scratch),
            spread=spread,
            train_loss_mean=sum(recent) / len(recent) if recent else math.nan,
            bytes_sent_mean=sum(self.bytes_sent) / len(self.bytes_sent),
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
