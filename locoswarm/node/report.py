"""What a node tells its user and its scrapers: the ready banner and file, the progress line,
the per-round log line and its machine-readable ``round-event``, the trainer's counters moved into
Prometheus, and the event-loop lag probe."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from locoswarm.node.config import NodeConfig
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.round import RoundOutcome
from locoswarm.node.trainer import Boundary, Trainer
from locoswarm.peers.membership import Membership
from locoswarm.sim.replay import EVENT_PREFIX
from locoswarm.tasks.inner import weights_digest

log = logging.getLogger("locoswarm.node")

LAG_TICK_S = 0.05
"""Period of the event-loop lag probe."""


class Reporter:
    def __init__(self, config: NodeConfig, metrics: NodeMetrics, info: dict[str, Any]) -> None:
        self.config = config
        self.metrics = metrics
        self.info = info
        self._seen: tuple[int, float, float] = (0, 0.0, 0.0)
        self.val_loss: float | None = None
        """The last validation loss measured."""
        self._rate_mark: tuple[float, int] | None = None

    def tokens_per_s(self, trainer: Trainer) -> float | None:
        """Tokens per second since the last call (None on the first)."""
        now, tokens = time.monotonic(), trainer.stats.tokens
        mark, self._rate_mark = self._rate_mark, (now, tokens)
        if mark is None or now <= mark[0]:
            return None
        return (tokens - mark[1]) / (now - mark[0])

    def announce_ready(self, membership: Membership, peer_id: str, address: str | None) -> None:
        cfg = self.config
        needs = self.join_needs()
        self.info.update(
            peer_id=peer_id,
            grpc=address,
            maddrs=membership.visible_maddrs(),
            join=membership.join_command() + needs,
        )
        print(
            f"locoswarm node {peer_id} ({cfg.sync.mode}, task {cfg.task.name}, "
            f"{self.info['parameters']:,} parameters on {self.info['device']})\n"
            f"  gRPC: {address or 'client mode (dials out only)'}\n"
            f"  metrics: {self.info.get('metrics', 'off')}\n"
            f"  others join with:\n    {self.info['join']}"
            + ("\n    (with copies of these files; the paths are this node's)" if needs else ""),
            flush=True,
        )
        self.write_ready()

    def write_ready(self) -> None:
        """The ready file (what tools and tests read): the node's info, rewritten in place."""
        if self.config.ready_file is not None:
            tmp = Path(f"{self.config.ready_file}.tmp")
            tmp.write_text(json.dumps(self.info) + "\n")
            tmp.replace(self.config.ready_file)  # a reader never sees half a file

    def join_needs(self) -> str:
        """The flags a joiner needs beyond the address: the swarm secret and the TLS CA (each
        joiner gives its own copy's path; ours are shown)."""
        cfg = self.config
        extra = ""
        if cfg.secret_file is not None:
            extra += f" --secret-file {shlex.quote(str(cfg.secret_file))}"
        tls = cfg.protocol.tls
        if tls.ca_file is not None:
            extra += f" --tls-ca {shlex.quote(str(tls.ca_file))}"
        elif tls.cert_file is not None:
            extra += " --tls-ca CA.pem"
        if tls.require_client_auth:
            extra += " --tls-cert CERT.pem --tls-key KEY.pem --tls-mutual"
        return extra

    def sync_metrics(self, trainer: Trainer) -> None:
        """Move the trainer thread's running totals into the Prometheus counters."""
        s = trainer.stats
        steps, compute, idle = self._seen
        self.metrics.inner_steps.inc(s.inner_steps - steps)
        self.metrics.tokens.inc((s.inner_steps - steps) * trainer.tokens_per_step)
        self.metrics.compute_seconds.inc(max(0.0, s.compute_s - compute))
        self.metrics.idle_seconds.inc(max(0.0, s.idle_s - idle))
        self._seen = (s.inner_steps, s.compute_s, s.idle_s)
        if trainer.device.type == "cuda":  # the caching allocator's counter: no device sync
            self.metrics.device_memory_peak.set(torch.cuda.max_memory_allocated(trainer.device))

    async def round_done(self, peer_id: str, b: Boundary, outcome: RoundOutcome) -> None:
        """Count the round, log its line and its ``round-event`` (what a replay of this swarm
        needs). Hashing whole models is whole-model work: off the loop."""
        self.metrics.exchanges.labels(result=outcome.result).inc()
        self.metrics.exchange_seconds.labels(result=outcome.result).observe(outcome.seconds)
        self.metrics.outer_step.set(outcome.round + 1)
        self.metrics.loss.set(b.loss)
        if b.val_loss is not None:
            self.metrics.val_loss.set(b.val_loss)
            self.val_loss = b.val_loss
        if outcome.distance is not None:
            self.metrics.distance.observe(outcome.distance)
        for clip in outcome.clips:
            if clip.threshold > 0 and not math.isinf(clip.threshold):
                self.metrics.clip_ratio.observe(clip.distance / clip.threshold)
        clipped = [c for c in outcome.clips if c.clipped]
        if clipped:
            self.metrics.clipped.inc()
            log.warning(
                "round %d: %s's message was clipped toward ours (%s)%s%s",
                outcome.round,
                outcome.partners[0] if outcome.partners else "?",
                ", ".join(
                    f"{c.name} at {c.distance:.2e}, limit {c.threshold:.2e}" for c in clipped
                ),
                "; a violation" if any(c.violation for c in clipped) else "",
                "; the peer is banned" if outcome.banned else "",
            )
        if outcome.banned:
            self.metrics.banned.labels(cause="clipped").inc()
        theta, phi = await asyncio.to_thread(
            lambda: (weights_digest(b.theta), weights_digest(outcome.phi))
        )
        ok = outcome.result == "ok"
        if ok:
            self.metrics.exchange_paths.labels(path=outcome.path).inc()
        quality = "" if b.val_loss is None else f", validation loss {b.val_loss:.4f}"
        if outcome.distance is not None:
            quality += f", partner distance {outcome.distance:.2e}"
        log.info(
            "round %d: %s, train loss %.4f%s, %.2fs, phi %s",
            outcome.round,
            "exchanged"
            if ok and outcome.path == "grpc"
            else f"exchanged over {outcome.path}"
            if ok
            else f"solo ({outcome.result})",
            b.loss,
            quality,
            outcome.seconds,
            phi,
        )
        event = {
            "peer": peer_id,
            "boundary": b.outer_step,
            "round": outcome.round,
            "outcome": "exchanged" if ok else outcome.result,
            "partners": list(outcome.partners),
            "path": outcome.path if ok else None,
            "partner_rounds": list(outcome.partner_rounds),
            "tokens": outcome.tokens,
            "applied_after": b.applied_after,
            "loss": b.loss,
            "val_loss": b.val_loss,
            "distance": outcome.distance,
            "clipped": [c.name for c in clipped],
            "blamed": any(c.violation for c in clipped),
            "banned": outcome.banned,
            "seconds": round(outcome.seconds, 4),
            "theta": theta,
            "phi": phi,
        }
        log.info("%s%s", EVENT_PREFIX, json.dumps(event))

    async def progress(
        self,
        trainer: Trainer,
        bytes_moved: dict[str, int],
        peers: Callable[[], int],
        round_now: Callable[[], int],
    ) -> None:
        """The console progress line every ``log_every_s``."""
        last_steps, last_compute, last_idle = 0, 0.0, 0.0
        last_time = time.monotonic()
        while True:
            await asyncio.sleep(self.config.log_every_s)
            self.sync_metrics(trainer)
            s = trainer.stats
            now = time.monotonic()
            steps = s.inner_steps - last_steps
            compute, idle = s.compute_s - last_compute, s.idle_s - last_idle
            busy = compute + idle
            print(
                f"step {trainer.step}  round {round_now()}  "
                f"loss {s.last_loss:.4f}  "
                f"{steps * trainer.tokens_per_step / max(now - last_time, 1e-9):,.0f} tok/s  "
                f"peers {peers()}  "
                f"up {bytes_moved['sent'] / 1e6:.1f} MB  "
                f"down {bytes_moved['received'] / 1e6:.1f} MB  "
                f"idle {100 * idle / busy if busy else 0:.1f}%",
                flush=True,
            )
            last_steps, last_compute, last_idle = s.inner_steps, s.compute_s, s.idle_s
            last_time = now

    async def watch_loop_lag(self) -> None:
        """How late the loop wakes a timer: whole-model work left on the loop shows here."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - start - LAG_TICK_S))
