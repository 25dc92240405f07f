"""The node daemon: owns every long-lived resource and task of one node.

Start order: DHT process (it forks) -> task and model -> metrics endpoint -> gRPC server and
client -> late join -> announce -> trainer thread and round loop. Stop order is the reverse. A
stop request lets the round in flight finish (or abort) within ``shutdown_grace_s``, writes a
checkpoint, withdraws the DHT record and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from locoswarm import __version__
from locoswarm.compression.config import CODEC_CHOICES
from locoswarm.errors import ConfigError, PeerError, PeerUnavailable, ProtocolViolation
from locoswarm.faultplan import NO_FAULTS, FaultPlan
from locoswarm.node import checkpoint
from locoswarm.node.config import NodeConfig, to_dict
from locoswarm.node.group import group_average, member_entry, parse_roster, shard_bounds
from locoswarm.node.handler import NodeHandler
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.outer import OuterStep, Prepared, fingerprint
from locoswarm.node.trainer import Boundary, Trainer, flat_params, pick_device
from locoswarm.peers import Matchmaker, PeerHealth, PeerRecord
from locoswarm.peers.membership import Membership, check_join_addresses
from locoswarm.protocol import (
    LocalView,
    PeerClient,
    PeerServer,
    ProtocolConfig,
    Received,
)
from locoswarm.protocol.reasons import REASONS
from locoswarm.tasks.inner import weights_digest
from locoswarm.tasks.task import TaskFactory, node_data_seed

log = logging.getLogger("locoswarm.node")
_LAG_TICK_S = 0.05
"""Period of the event-loop lag probe."""
_UNWIND_S = 5.0
"""Longest wait for a cancelled round to unwind (its worker-thread calls cannot be interrupted)."""
REFUSALS = ("busy", "stale_round", "shutting_down")
"""Reasons a peer declines an exchange without anything being wrong: no backoff."""


def _read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"secret_file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"secret_file {path}: the secret must be at least 16 bytes")
    return secret


@dataclass(frozen=True, slots=True)
class Parts:
    """The wired components one node's rounds use."""

    trainer: Trainer
    outer: OuterStep
    handler: NodeHandler
    matchmaker: Matchmaker[list[Tensor]]
    membership: Membership
    client: PeerClient
    record: PeerRecord


class Daemon:
    """One node. ``await Daemon(config).run()``; ``request_stop()`` from a signal handler."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.metrics = NodeMetrics()
        self._stop = asyncio.Event()
        self._train_stop = threading.Event()
        self.next_round = 0
        self.round_offset = 0
        """Global round = the trainer's boundary count + this (moves forward on catch-up)."""
        self.peer_id = ""
        self._view: list[PeerRecord] = []
        self.info: dict[str, Any] = {}
        self.faults = NO_FAULTS
        self._metrics_seen: tuple[int, float, float] = (0, 0.0, 0.0)
        self._exchange_failed = False
        """An exchange this round was accepted or attempted and then failed (not refused)."""
        self._stop_at = math.inf
        self._delivered = -1
        """The last boundary whose update went to the trainer."""
        if config.debug.fault_plan is not None:
            try:
                self.faults = FaultPlan.load(config.debug.fault_plan)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            log.warning(
                "fault plan %s is active: this node injects faults", config.debug.fault_plan
            )

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
        self._stop.set()
        self._train_stop.set()

    # -- the story of a node ------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        check_join_addresses(cfg.peers.initial_peers)
        secret = _read_secret(cfg.secret_file)
        peers_cfg = dataclasses.replace(
            cfg.peers, run_id=cfg.run_id, group_size=cfg.sync.group_size
        )
        async with contextlib.AsyncExitStack() as stack:
            membership = await stack.enter_async_context(Membership.start(peers_cfg))
            self.peer_id = membership.dht_peer_id
            trainer, outer = await asyncio.to_thread(self._build)
            restored = await asyncio.to_thread(self._restore, trainer, outer)
            if cfg.metrics_port is not None:
                port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
                stack.callback(self.metrics.close)
                self.info["metrics"] = f"http://{_display_host(cfg.metrics_host)}:{port}/metrics"
            health = PeerHealth(peers_cfg)
            matchmaker: Matchmaker[list[Tensor]] = Matchmaker(
                peers_cfg, self.peer_id, health=health
            )
            protocol = _protocol_config(cfg.protocol, secret)
            bucket = protocol.make_bucket()
            handler = NodeHandler(
                outer=outer,
                matchmaker=matchmaker,
                health=health,
                metrics=self.metrics,
                version=__version__,
                match_wait_s=cfg.sync.match_deadline_s,
                exchange_wait_s=cfg.sync.exchange_timeout_s,
                group_size=cfg.sync.group_size,
                decode=lambda received, names: asyncio.to_thread(outer.decode, received, names),
                num_peers=lambda: max(0, len(self._view) - 1),
            )
            handler.outer_step = self.next_round
            address = None
            if not peers_cfg.client_mode:
                server = await stack.enter_async_context(
                    PeerServer.start(protocol, handler, bucket=bucket, faults=self.faults)
                )
                address = cfg.announce or f"{_display_host(protocol.host)}:{server.port}"
                self.info["grpc_port"] = server.port  # the bound port (announce may differ)
            client = PeerClient(
                protocol,
                peer_id=self.peer_id,
                bucket=bucket,
                on_transfer=handler.on_transfer,
                faults=self.faults,
            )
            stack.push_async_callback(client.close)
            if peers_cfg.initial_peers and (
                not restored or await self._far_behind(membership, outer)
            ):
                await self._late_join(membership, client, trainer, outer)
            handler.outer_step = self.next_round
            record = PeerRecord(
                peer_id=self.peer_id,
                address=address,
                outer_step=self.next_round,
                model_fingerprint=outer.fingerprint,
                sync=cfg.sync.mode,
                version=__version__,
                capabilities=CODEC_CHOICES,
            )
            await membership.announce(record)
            self._announce_ready(membership, address)
            await self._wait_for_peers(membership, outer)
            try:
                async with asyncio.TaskGroup() as tasks:
                    refresher = tasks.create_task(membership.refresh_forever(), name="refresh")
                    progress = tasks.create_task(self._progress(trainer, handler), name="progress")
                    lag = tasks.create_task(self._watch_loop_lag(), name="loop-lag")
                    await self._train(
                        Parts(trainer, outer, handler, matchmaker, membership, client, record)
                    )
                    refresher.cancel()
                    progress.cancel()
                    lag.cancel()
            finally:
                handler.stopping = True
                await asyncio.to_thread(self._final_checkpoint, trainer, outer)

    async def _watch_loop_lag(self) -> None:
        """How late the loop wakes a timer: whole-model work left on the loop shows here."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(_LAG_TICK_S)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - start - _LAG_TICK_S))

    async def _wait_for_peers(self, membership: Membership, outer: OuterStep) -> None:
        """Hold the first round until ``peers.min_peers`` compatible nodes are live (bounded)."""
        want = self.config.peers.min_peers
        if want <= 0:
            return
        deadline = time.monotonic() + self.config.peers.min_peers_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            view = await self._refresh_view(membership)
            seen = [
                r
                for r in view
                if r.peer_id != self.peer_id and r.model_fingerprint == outer.fingerprint
            ]
            if len(seen) >= want:
                log.info("%d peers are live: starting", len(seen))
                return
            await asyncio.sleep(0.5)
        log.warning(
            "fewer than %d peers after %.0fs: starting anyway",
            want,
            self.config.peers.min_peers_timeout_s,
        )

    # -- building and restoring ----------------------------------------------------------------

    def _build(self) -> tuple[Trainer, OuterStep]:
        cfg = self.config
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every node of the run
        task = TaskFactory(cfg.task).build(
            replica=0, num_replicas=1, seed=node_data_seed(self.peer_id)
        )
        device = pick_device(cfg.trainer.device)
        total = cfg.sync.rounds * cfg.sync.inner_steps if cfg.sync.rounds else None
        trainer = Trainer(
            task,
            cfg.trainer.inner,
            inner_steps=cfg.sync.inner_steps,
            total_steps=total,
            device=device,
            tokens_per_step=cfg.task.batch_size * cfg.task.seq_len,
        )
        phi = flat_params(trainer.model)
        shapes = [tuple(p.shape) for p in trainer.model.parameters()]
        outer = OuterStep(cfg, phi, peer_id=self.peer_id, fp=fingerprint(cfg, shapes))
        self.info.update(device=str(device), parameters=phi.numel(), fingerprint=outer.fingerprint)
        self.metrics.info.labels(
            version=__version__,
            run_id=cfg.run_id,
            sync=cfg.sync.mode,
            task=cfg.task.name,
            device=str(device),
        ).set(1)
        return trainer, outer

    def _restore(self, trainer: Trainer, outer: OuterStep) -> bool:
        directory = self.config.checkpoint.dir
        if directory is None:
            return False
        found = checkpoint.load_latest(Path(directory))
        if found is None:
            return False
        path, state = found
        if state.get("fingerprint") != outer.fingerprint:
            raise ConfigError(
                f"checkpoint {path} is for model fingerprint {state.get('fingerprint')}, this "
                f"configuration has {outer.fingerprint}: use another --checkpoint-dir"
            )
        trainer.load_state_dict(state["trainer"])
        outer.load_state_dict(state["outer"])
        self.next_round = int(state["outer_step"])
        log.info(
            "resumed from %s at round %d, step %d: weights %s, phi %s",
            path,
            self.next_round,
            trainer.step,
            weights_digest(flat_params(trainer.model)),
            weights_digest(outer.phi),
        )
        return True

    def _save(self, outer_step: int, trainer_state: dict[str, Any], outer: OuterStep) -> None:
        directory = self.config.checkpoint.dir
        if directory is None:
            return
        outer_state = outer.state_dict()  # one round's state, read once
        state = {
            "outer_step": outer_step,
            "trainer": trainer_state,
            "outer": outer_state,
            "fingerprint": outer.fingerprint,
            "config": json.dumps(to_dict(self.config)),
        }
        path = checkpoint.save(
            Path(directory), outer_step, state, keep=self.config.checkpoint.keep, faults=self.faults
        )
        weights = torch.nn.utils.parameters_to_vector(
            [t.float() for t in trainer_state["model"].values()]
        )
        log.info(
            "checkpoint %s at round %d, step %d: weights %s, phi %s",
            path,
            outer_step,
            trainer_state["step"],
            weights_digest(weights),
            weights_digest(outer_state["state"]["phi"]),
        )

    def _final_checkpoint(self, trainer: Trainer, outer: OuterStep) -> None:
        trainer._apply_pending()  # the trainer thread has stopped: apply the last outer update
        try:
            self._save(outer.next_round, trainer.state_dict(), outer)
        except OSError as exc:
            log.error("could not write the final checkpoint: %s", exc)

    async def _far_behind(self, membership: Membership, outer: OuterStep) -> bool:
        """Whether the swarm moved past our restored checkpoint by more than the lag window:
        then its current state is worth more than ours (a late joiner's start)."""
        try:
            records = await asyncio.wait_for(membership.list_peers(), 15)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - the DHT is best effort here
            log.warning("could not list peers to compare rounds: %s", exc)
            return False
        steps = sorted(
            r.outer_step
            for r in records
            if r.peer_id != self.peer_id
            and r.model_fingerprint == outer.fingerprint
            and r.sync == outer.mode
        )
        if not steps:
            return False
        swarm = steps[len(steps) // 2]
        window = self.config.peers.lag_window
        if swarm - self.next_round <= window:
            return False
        log.warning(
            "the swarm is at round %d, our checkpoint at round %d (more than the lag window of "
            "%d behind): fetching the swarm's current state instead",
            swarm,
            self.next_round,
            window,
        )
        return True

    async def _late_join(
        self, membership: Membership, client: PeerClient, trainer: Trainer, outer: OuterStep
    ) -> None:
        """Start from a live peer's outer weights and round when the swarm is already going."""
        try:
            records = await asyncio.wait_for(membership.list_peers(), 15)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - the DHT is best effort here
            log.warning("could not list peers for a late join: %s", exc)
            return
        live = [
            r
            for r in records
            if r.peer_id != self.peer_id
            and r.address
            and r.outer_step > 0
            and r.model_fingerprint == outer.fingerprint
            and r.sync == outer.mode
        ]
        for record in sorted(live, key=lambda r: -r.outer_step):
            assert record.address is not None
            view = LocalView(run_id=self.config.run_id, model_fingerprint=outer.fingerprint)
            try:
                state = await client.fetch_state(record.address, view=view)
                await asyncio.to_thread(outer.load_state_payload, state)
            except PeerError as exc:
                log.warning("could not fetch state from %s: %s", record.peer_id, exc)
                continue
            await asyncio.to_thread(trainer.set_weights, outer.phi)
            self.next_round = state.header.outer_step
            self.round_offset = 0
            trainer.step = self.next_round * self.config.sync.inner_steps
            log.info(
                "late join: fetched the outer weights of round %d from %s (phi %s)",
                self.next_round,
                record.peer_id,
                await asyncio.to_thread(weights_digest, outer.phi),
            )
            return

    # -- training and outer steps --------------------------------------------------------------

    async def _train(self, parts: Parts) -> None:
        cfg = self.config
        trainer = parts.trainer
        loop = asyncio.get_running_loop()
        boundaries: asyncio.Queue[Boundary] = asyncio.Queue()
        every = cfg.checkpoint.every_rounds
        first = self.next_round

        def want_state(r: int) -> bool:
            return cfg.checkpoint.dir is not None and r > first and r % every == 0

        thread = asyncio.ensure_future(
            asyncio.to_thread(
                trainer.run,
                first_outer_step=first,
                stop=self._train_stop,
                on_boundary=lambda b: _post(loop, boundaries, b),
                want_state=want_state,
                overlap=cfg.sync.overlap,
            )
        )
        try:
            while not self._stop.is_set():
                getter = asyncio.ensure_future(boundaries.get())
                stopper = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait(
                    {getter, stopper, thread}, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in (getter, stopper):
                    if waiter not in done:
                        waiter.cancel()
                if thread in done:
                    thread.result()  # re-raise a crash of the trainer thread
                    break
                if getter not in done:
                    break
                boundary = getter.result()
                if boundary.state is not None:
                    await asyncio.to_thread(
                        self._save,
                        boundary.outer_step + self.round_offset,
                        boundary.state,
                        parts.outer,
                    )
                round_task = asyncio.ensure_future(self._round(boundary, parts))
                try:
                    await self._await_round(round_task)
                except Exception:  # a bug in one round must not end the node
                    log.exception("round %d failed on our side; training on", self.next_round)
                    self._round_crashed(boundary, parts)
                if cfg.sync.rounds and self.next_round >= cfg.sync.rounds:
                    log.info("finished %d rounds", cfg.sync.rounds)
                    self.request_stop()
        finally:
            self._train_stop.set()
            await asyncio.wait({thread})  # the thread checks the stop flag every inner step
            if not thread.cancelled() and thread.exception() is not None:
                log.error("the trainer thread failed", exc_info=thread.exception())

    async def _await_round(self, task: asyncio.Future[Any]) -> None:
        """Wait for the round in flight. A stop gives it half of ``shutdown_grace_s`` (counted
        from the stop request; the other half is for the checkpoint and the teardown), then
        cancels it and waits for it to unwind. A cancelled round changed nothing: the outer
        state is swapped in one step at its end. Re-raises the round's own error."""
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                left = self.config.shutdown_grace_s / 2 - (time.monotonic() - self._stop_at)
                await asyncio.wait({task}, timeout=max(0.0, left))
            if not task.done():
                log.warning(
                    "stopping: round %d did not finish within the shutdown grace; abandoned",
                    self.next_round,
                )
                task.cancel()
                await asyncio.wait({task}, timeout=_UNWIND_S)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task}, timeout=_UNWIND_S)
            raise
        finally:
            stopper.cancel()
        if task.done() and not task.cancelled():
            task.result()

    async def _round(self, b: Boundary, parts: Parts) -> None:
        cfg = self.config
        trainer, outer, handler = parts.trainer, parts.outer, parts.handler
        matchmaker, membership, client, record = (
            parts.matchmaker,
            parts.membership,
            parts.client,
            parts.record,
        )
        start = time.perf_counter()
        view = await self._refresh_view(membership)
        r = self._catch_up(b.outer_step, view, outer)
        prepared = await asyncio.to_thread(outer.prepare, r, b.theta)
        await self._round_faults(r, prepared)
        grouped = cfg.sync.group_size > 2
        current = handler.open_round(prepared, group=grouped)
        self._exchange_failed = False
        partner: list[Tensor] | None = None
        partner_id = ""
        mean: Tensor | None = None
        result = "solo"
        try:
            async with asyncio.timeout(cfg.sync.match_deadline_s + cfg.sync.exchange_timeout_s):
                me = dataclasses.replace(record, outer_step=r)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(membership.announce(me), 5)
                propose = (
                    self._join_proposer(client, outer)
                    if grouped
                    else self._proposer(prepared, client, handler)
                )
                match = await matchmaker.match(
                    me, view, propose, deadline_s=cfg.sync.match_deadline_s
                )
                if self.faults.fire("exchange", outer_step=r) is not None:
                    raise RuntimeError(f"fault plan: an injected error in round {r}'s exchange")
                if match.role != "solo" or self._exchange_failed:
                    result = "failed"  # until the exchange is done
                if grouped and match.role != "solo":
                    mean = await self._group_step(match, current, prepared, client, outer, record)
                elif match.role == "dialler":
                    partner = match.sessions[match.partners[0]]
                    partner_id = match.partners[0]
                elif match.role == "responder":
                    partner = await current.partner
                    partner_id = current.responder_peer or ""
                if partner is not None or mean is not None:
                    result = "ok"
        except TimeoutError:
            result = "failed"
        except PeerError as exc:
            log.info("round %d: the group step failed: %s", r, exc)
            result = "failed"
        except Exception:  # our own bug: a solo step, counted and logged
            log.exception("round %d: the exchange failed on our side; taking a solo step", r)
            result, partner, mean = "error", None, None
        finally:
            handler.close_round()
        partners: tuple[str, ...] = ()
        if self.faults.fire("apply", outer_step=r) is not None:
            raise RuntimeError(f"fault plan: an injected error before round {r}'s update")
        if mean is not None:
            assert current.group is not None  # a group's mean comes from a group round
            partners = tuple(p for p in current.group.members_ids() if p != self.peer_id)
            phi = await asyncio.to_thread(outer.apply_mean, prepared, mean)
        elif partner is not None:
            partners = (partner_id,)
            phi = await asyncio.to_thread(outer.apply, prepared, partner)
        else:
            phi = await asyncio.to_thread(outer.solo, prepared)
        self.metrics.exchanges.labels(result=result).inc()
        self.metrics.exchange_seconds.labels(result=result).observe(time.perf_counter() - start)
        self._sync_metrics(trainer)
        trainer.deliver(b.outer_step, phi, b.theta)  # phi is never changed in place
        self._delivered = b.outer_step
        self.next_round = r + 1
        handler.outer_step = self.next_round
        self.metrics.outer_step.set(self.next_round)
        self.metrics.loss.set(b.loss)
        # Hashing whole models is whole-model work: off the loop.
        theta_digest, phi_digest = await asyncio.to_thread(
            lambda: (weights_digest(b.theta), weights_digest(phi))
        )
        log.info(
            "round %d: %s, train loss %.4f, %.2fs, phi %s",
            r,
            "exchanged" if result == "ok" else f"solo ({result})",
            b.loss,
            time.perf_counter() - start,
            phi_digest,
        )
        # One machine-readable event per round: what a replay of this swarm needs.
        event = {
            "peer": self.peer_id,
            "boundary": b.outer_step,
            "round": r,
            "outcome": "exchanged" if result == "ok" else result,
            "partners": list(partners),
            "partner_rounds": [outer.heard.get(p, r) for p in partners],
            "applied_after": b.applied_after,
            "theta": theta_digest,
            "phi": phi_digest,
        }
        log.info("round-event %s", json.dumps(event))

    def _round_crashed(self, b: Boundary, parts: Parts) -> None:
        """A round ended by an unexpected error of ours: count it, log its traceback, and let
        the trainer go on. The outer state is swapped as one value, so it is either this round's
        or the last one's; if the update never reached the trainer, theta keeps its progress
        (the next round's pseudo-gradient carries this one's)."""
        self.metrics.exchanges.labels(result="error").inc()
        if self._delivered != b.outer_step:
            parts.trainer.deliver(b.outer_step, b.theta, b.theta)  # no change to theta
            self._delivered = b.outer_step
            self.next_round = max(self.next_round, b.outer_step + self.round_offset + 1)
            parts.handler.outer_step = self.next_round

    async def _round_faults(self, r: int, prepared: Prepared) -> None:
        """Test seam: stall or kill at a round boundary; poison our message with a NaN."""
        fault = self.faults.fire("round", outer_step=r)
        if fault is not None and fault.action in ("delay", "stall"):
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.faults.fire("prepare", outer_step=r) is not None and prepared.outgoing.payload:
            nan = struct.pack("<f", float("nan"))
            prepared.outgoing.payload = nan + bytes(prepared.outgoing.payload[4:])

    def _catch_up(self, local_step: int, view: list[PeerRecord], outer: OuterStep) -> int:
        """This round's outer step: our own count, moved forward to the swarm's median when we
        fell behind (a late joiner, a slow node). Round numbers are labels that let partners
        meet; the maths does not depend on them, and they never go backward."""
        r = local_step + self.round_offset
        steps = sorted(
            rec.outer_step
            for rec in view
            if rec.peer_id != self.peer_id
            and rec.model_fingerprint == outer.fingerprint
            and rec.sync == outer.mode
        )
        if steps and steps[len(steps) // 2] > r:
            target = steps[len(steps) // 2]
            log.info("round %d: the swarm is at round %d; catching up", r, target)
            self.round_offset += target - r
            r = target
        return r

    async def _refresh_view(self, membership: Membership) -> list[PeerRecord]:
        try:
            self._view = await asyncio.wait_for(membership.list_peers(), 10)
        except Exception as exc:  # noqa: BLE001 - a DHT hiccup: go on with the last view
            log.warning("could not list peers: %s", exc)
        self.metrics.peers.set(max(0, len(self._view) - 1))
        return self._view

    def _count_refusal(self, exc: PeerError) -> None:
        """Payloads we refused as the dialler count like the ones the server refuses."""
        if isinstance(exc, ProtocolViolation) and exc.reason in REASONS:
            self.metrics.rejected.labels(reason=exc.reason).inc()

    def _address_of(self, peer: str) -> str | None:
        record = next((r for r in self._view if r.peer_id == peer), None)
        return None if record is None else record.address

    def _join_proposer(self, client: PeerClient, outer: OuterStep) -> Any:
        """Group proposals: an Exchange of kind ``join`` without tensors."""
        cfg = self.config

        async def propose(peer: str, outer_step: int) -> list[Tensor] | None:
            address = self._address_of(peer)
            if address is None:
                return None
            view = LocalView(
                run_id=cfg.run_id, model_fingerprint=outer.fingerprint, outer_step=outer_step
            )
            try:
                await client.exchange(
                    address,
                    outer.control(outer_step, "join"),
                    view=view,
                    timeout_s=cfg.sync.match_deadline_s,
                )
            except PeerError as exc:
                self._count_refusal(exc)
                if exc.reason in REFUSALS:
                    return None
                self._exchange_failed = True
                raise
            return []

        return propose

    async def _group_step(
        self,
        match: Any,
        current: Any,
        prepared: Prepared,
        client: PeerClient,
        outer: OuterStep,
        record: PeerRecord,
    ) -> Tensor:
        """Leader: send the roster; member: wait for it. Then average over the group."""
        cfg = self.config
        group = current.group
        r = prepared.outer_step
        view = LocalView(run_id=cfg.run_id, model_fingerprint=outer.fingerprint, outer_step=r)
        if match.role == "dialler":
            # Sorted by id: the group's mean is summed in this order, as the simulator sums it.
            roster = tuple(
                sorted(
                    (
                        member_entry(self.peer_id, record.address),
                        *(member_entry(p, self._address_of(p)) for p in match.partners),
                    )
                )
            )
            group.roster.set_result(roster)

            async def send(peer: str) -> None:
                address = self._address_of(peer)
                if address is not None:
                    with contextlib.suppress(PeerError):
                        await client.exchange(
                            address,
                            outer.control(r, "roster", roster),
                            view=view,
                            timeout_s=cfg.sync.match_deadline_s,
                        )

            await asyncio.gather(*(send(p) for p in match.partners))
        else:
            try:
                await asyncio.wait_for(asyncio.shield(group.roster), cfg.sync.match_deadline_s)
            except TimeoutError:
                raise PeerUnavailable(
                    match.partners[0], "no roster from our group's leader"
                ) from None
        roster = group.roster.result()
        ids = [p for p, _ in parse_roster(roster, None)]
        vector = await asyncio.to_thread(outer.group_vector, prepared)
        bounds = shard_bounds(vector.numel(), len(ids))
        me = ids.index(self.peer_id)

        async def swap(phase: str, peer: str, address: str, shard: Tensor) -> Tensor:
            # reduce-scatter brings back our own shard; all-gather the peer's
            lo, hi = bounds[me] if phase == "rs" else bounds[ids.index(peer)]
            got: list[Tensor] = []

            async def check(received: Received) -> None:
                got.append(await asyncio.to_thread(outer.decode_shard, received, hi - lo))

            await client.exchange(
                address,
                outer.shard_message(r, phase, shard, roster),
                view=view,
                timeout_s=cfg.sync.exchange_timeout_s,
                check=check,
            )
            return got[0]

        return await group_average(
            group, self.peer_id, vector, swap, timeout_s=cfg.sync.exchange_timeout_s
        )

    def _proposer(self, prepared: Prepared, client: PeerClient, handler: NodeHandler) -> Any:
        cfg = self.config
        outer = handler.outer

        async def propose(peer: str, outer_step: int) -> list[Tensor] | None:
            record = next((r for r in self._view if r.peer_id == peer), None)
            if record is None or record.address is None:
                return None
            decoded: list[list[Tensor]] = []

            async def check(received: Received) -> None:
                try:
                    decoded.append(await asyncio.to_thread(outer.decode, received, None))
                except ProtocolViolation as exc:
                    raise ProtocolViolation(
                        peer, f"payload did not decode: {exc}", reason="rejected"
                    ) from exc

            view = LocalView(
                run_id=cfg.run_id, model_fingerprint=outer.fingerprint, outer_step=outer_step
            )
            try:
                await client.exchange(
                    record.address,
                    prepared.outgoing,
                    view=view,
                    timeout_s=cfg.sync.exchange_timeout_s,
                    check=check,
                )
            except PeerError as exc:
                log.info("exchange with %s for round %d: %s", peer, outer_step, exc)
                self._count_refusal(exc)
                if exc.reason in REFUSALS:
                    return None  # a refusal, not a fault: no backoff
                self._exchange_failed = True
                raise  # the matchmaker backs off (or bans) the peer
            return decoded[0] if decoded else None

        return propose

    # -- reporting -----------------------------------------------------------------------------

    def _announce_ready(self, membership: Membership, address: str | None) -> None:
        cfg = self.config
        self.info.update(
            peer_id=self.peer_id,
            grpc=address,
            maddrs=membership.visible_maddrs(),
            join=membership.join_command(),
            round=self.next_round,
        )
        print(
            f"locoswarm node {self.peer_id} ({cfg.sync.mode}, task {cfg.task.name}, "
            f"{self.info['parameters']:,} parameters on {self.info['device']})\n"
            f"  gRPC: {address or 'client mode (dials out only)'}\n"
            f"  metrics: {self.info.get('metrics', 'off')}\n"
            f"  others join with:\n    {self.info['join']}",
            flush=True,
        )
        if cfg.ready_file is not None:
            Path(cfg.ready_file).write_text(json.dumps(self.info) + "\n")

    def _sync_metrics(self, trainer: Trainer) -> None:
        """Move the trainer thread's running totals into the Prometheus counters."""
        s = trainer.stats
        steps, compute, idle = self._metrics_seen
        self.metrics.inner_steps.inc(s.inner_steps - steps)
        self.metrics.tokens.inc((s.inner_steps - steps) * trainer.tokens_per_step)
        self.metrics.compute_seconds.inc(max(0.0, s.compute_s - compute))
        self.metrics.idle_seconds.inc(max(0.0, s.idle_s - idle))
        self._metrics_seen = (s.inner_steps, s.compute_s, s.idle_s)

    async def _progress(self, trainer: Trainer, handler: NodeHandler) -> None:
        last_steps, last_compute, last_idle = 0, 0.0, 0.0
        last_time = time.monotonic()
        while True:
            await asyncio.sleep(self.config.log_every_s)
            self._sync_metrics(trainer)
            s = trainer.stats
            now = time.monotonic()
            steps = s.inner_steps - last_steps
            compute, idle = s.compute_s - last_compute, s.idle_s - last_idle
            busy = compute + idle
            print(
                f"step {trainer.step}  round {self.next_round}  loss {s.last_loss:.4f}  "
                f"{steps * trainer.tokens_per_step / max(now - last_time, 1e-9):,.0f} tok/s  "
                f"peers {max(0, len(self._view) - 1)}  "
                f"up {handler.bytes['sent'] / 1e6:.1f} MB  "
                f"down {handler.bytes['received'] / 1e6:.1f} MB  "
                f"idle {100 * idle / busy if busy else 0:.1f}%",
                flush=True,
            )
            last_steps, last_compute, last_idle, last_time = (
                s.inner_steps,
                s.compute_s,
                s.idle_s,
                now,
            )


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Boundary], b: Boundary) -> None:
    loop.call_soon_threadsafe(queue.put_nowait, b)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _protocol_config(protocol: ProtocolConfig, secret: bytes | None) -> ProtocolConfig:
    limits = dataclasses.replace(protocol.limits, allowed_codecs=frozenset((*CODEC_CHOICES, "siq")))
    auth = dataclasses.replace(protocol.auth, secret=secret) if secret else protocol.auth
    return dataclasses.replace(protocol, limits=limits, auth=auth)


@contextlib.asynccontextmanager
async def running(config: NodeConfig) -> AsyncIterator[Daemon]:
    """Run a daemon in the background of the current loop (tests and the demo)."""
    daemon = Daemon(config)
    task = asyncio.ensure_future(daemon.run())
    try:
        yield daemon
    finally:
        daemon.request_stop()
        await task
