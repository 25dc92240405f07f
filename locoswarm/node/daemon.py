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
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from locoswarm import __version__
from locoswarm.compression.config import CODEC_CHOICES
from locoswarm.errors import ConfigError
from locoswarm.faultplan import NO_FAULTS, FaultPlan
from locoswarm.node import checkpoint
from locoswarm.node.allocator import release_free_memory, tune_for
from locoswarm.node.config import NodeConfig
from locoswarm.node.diagnosis import Diagnosis
from locoswarm.node.handler import NodeHandler
from locoswarm.node.metrics import CAUSES, NodeMetrics
from locoswarm.node.outer import OuterStep, fingerprint
from locoswarm.node.paths import Paths
from locoswarm.node.ranks import RankLost, Ranks
from locoswarm.node.reachability import self_test
from locoswarm.node.report import Reporter
from locoswarm.node.round import RoundRunner
from locoswarm.node.trainer import Boundary, Trainer, flat_params, pick_device
from locoswarm.node.view import SwarmView
from locoswarm.peers import Matchmaker, PeerHealth, PeerRecord
from locoswarm.peers.config import default_pairing
from locoswarm.peers.membership import Membership, check_join_addresses
from locoswarm.peers.reach import ProbeService
from locoswarm.peers.records import LIBP2P, PeerStats
from locoswarm.protocol import PeerClient, PeerServer, ProtocolConfig
from locoswarm.protocol.server import Servicer
from locoswarm.sync.rounds import Partner
from locoswarm.tasks.task import TaskFactory, node_data_seed

log = logging.getLogger("locoswarm.node")
IDENTITY_FILE = "identity.key"
"""The identity key's file name in the checkpoint folder."""
_UNWIND_S = 5.0
"""Longest wait for a cancelled round to unwind (its worker-thread calls cannot be interrupted)."""


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


def identity_path(cfg: NodeConfig) -> Path | None:
    """Where the node's identity key lives: ``peers.identity_path``, else in the checkpoint folder
    (a restarted node keeps its peer id, its signed record and the address others join), else
    nowhere (a key for this run only)."""
    if cfg.peers.identity_path is not None:
        return cfg.peers.identity_path
    if cfg.checkpoint.dir is not None:
        return cfg.checkpoint.dir / IDENTITY_FILE
    return None


class Daemon:
    """One node. ``await Daemon(config).run()``; ``request_stop()`` from a signal handler."""

    def __init__(self, config: NodeConfig, ranks: Ranks | None = None) -> None:
        self.config = config
        self.ranks = ranks
        """The node's local ranks when it has several (this process is rank 0)."""
        self.metrics = NodeMetrics()
        self._stop = asyncio.Event()
        self._train_stop = threading.Event()
        self._stop_at = math.inf
        self.next_round = 0
        self.peer_id = ""
        self.info: dict[str, Any] = {}
        self.reporter = Reporter(config, self.metrics, self.info)
        self.faults = NO_FAULTS
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
        # Before the threads and tensors of the node exist (the process's allocator settings).
        tuning = tune_for(cfg.trainer)
        log.debug("C allocator: %s", ", ".join(tuning.applied) or tuning.skipped)
        secret = _read_secret(cfg.secret_file)
        peers_cfg = dataclasses.replace(
            cfg.peers,
            run_id=cfg.run_id,
            group_size=cfg.sync.group_size,
            pairing=cfg.peers.pairing or default_pairing(cfg.sync.mode, cfg.sync.group_size),
            identity_path=identity_path(cfg),
        )
        async with contextlib.AsyncExitStack() as stack:
            membership = await stack.enter_async_context(Membership.start(peers_cfg))
            self.peer_id = membership.dht_peer_id
            self.diagnosis = Diagnosis(
                has_secret=secret is not None,
                run_id=cfg.run_id,
                version=__version__,
            )
            view = SwarmView(
                cfg, self.peer_id, membership, self.metrics, secret=secret, diagnosis=self.diagnosis
            )
            trainer, outer = await asyncio.to_thread(self._build)
            view.fingerprint = outer.fingerprint
            restored = await asyncio.to_thread(checkpoint.restore_node, cfg, trainer, outer)
            self.next_round = restored or 0
            if cfg.metrics_port is not None:
                port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
                stack.callback(self.metrics.close)
                self.info["metrics"] = f"http://{_display_host(cfg.metrics_host)}:{port}/metrics"
            health = PeerHealth(peers_cfg)
            matchmaker: Matchmaker[Partner] = Matchmaker(peers_cfg, self.peer_id, health=health)
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
                decode=lambda received: asyncio.to_thread(outer.decode, received),
                num_peers=lambda: view.num_peers,
            )
            handler.outer_step = self.next_round
            address = None
            servicer = Servicer(protocol, handler, bucket, self.faults)
            if not peers_cfg.client_mode:
                server = await stack.enter_async_context(
                    PeerServer.start(
                        protocol,
                        handler,
                        bucket=bucket,
                        faults=self.faults,
                        peer_id=self.peer_id,
                        servicer=servicer,
                    )
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
            # Every node dials the addresses peers ask it to test (their reachability probes),
            # and serves exchanges over libp2p streams (the path to nodes without an address).
            p2p = await membership.p2p()
            await ProbeService(client.reachable).start(p2p)
            paths = Paths(
                p2p, view.record_of, self.metrics, relay_budget=protocol.relay_budget_bytes
            )
            await paths.serve(servicer.streams(self.peer_id))
            stack.callback(setattr, servicer, "stopping", True)
            if peers_cfg.initial_peers and (
                restored is None or await view.far_behind(self.next_round, outer)
            ):
                joined = await view.late_join(client, trainer, outer, paths.route_to)
                self.next_round = self.next_round if joined is None else joined
            handler.outer_step = self.next_round
            record = PeerRecord(
                peer_id=self.peer_id,
                address=address,
                outer_step=self.next_round,
                model_fingerprint=outer.fingerprint,
                sync=cfg.sync.mode,
                version=__version__,
                capabilities=(*CODEC_CHOICES, LIBP2P),
                secret_proof=view.proof(self.peer_id),
            )
            await membership.announce(record)
            self.info["round"] = self.next_round
            self.reporter.announce_ready(membership, self.peer_id, address)
            await view.wait_for_peers(outer, self._stop)
            runner = RoundRunner(
                config=cfg,
                peer_id=self.peer_id,
                outer=outer,
                handler=handler,
                matchmaker=matchmaker,
                view=view,
                client=client,
                record=record,
                metrics=self.metrics,
                faults=self.faults,
                route=paths.route,
            )
            try:
                async with asyncio.TaskGroup() as tasks:
                    background = [
                        tasks.create_task(membership.refresh_forever(), name="refresh"),
                        tasks.create_task(
                            self.reporter.progress(
                                trainer,
                                handler.bytes,
                                lambda: view.num_peers,
                                lambda: self.next_round,
                            ),
                            name="progress",
                        ),
                        tasks.create_task(self.reporter.watch_loop_lag(), name="loop-lag"),
                        tasks.create_task(self._reach_test(membership, address), name="reach"),
                    ]
                    await self._train(trainer, runner)
                    for task in background:
                        task.cancel()
            finally:
                handler.stopping = True
                await asyncio.to_thread(self._final_checkpoint, trainer, outer)

    async def _reach_test(self, membership: Membership, address: str | None) -> None:
        """The reachability self-test; its answer goes to the log, the gauge and the ready
        file. Never fails the node."""
        try:
            reachable = await self_test(
                membership, address, self.config.peers.initial_peers, self.metrics
            )
        except Exception:  # a diagnosis must not stop training
            log.exception("reachability: the self-test failed")
            return
        self.info["reachable"] = reachable
        self.reporter.write_ready()

    def _build(self) -> tuple[Trainer, OuterStep]:
        cfg = self.config
        seed = node_data_seed(self.peer_id)
        if self.ranks is not None:
            self.ranks.objects(seed)  # the followers build their data streams from it
        trainer = build_trainer(cfg, seed, self.ranks)
        device = trainer.device
        phi = flat_params(trainer.model)  # a fresh buffer: the outer state keeps it
        shapes = [tuple(p.shape) for p in trainer.model.parameters()]
        outer = OuterStep(cfg, phi, peer_id=self.peer_id, fp=fingerprint(cfg, shapes), copy=False)
        outer.tokens = trainer.tokens_per_step * cfg.sync.inner_steps
        if self.ranks is not None:
            self.info["ranks"] = self.ranks.world
        self.info.update(device=str(device), parameters=phi.numel(), fingerprint=outer.fingerprint)
        self.metrics.info.labels(
            version=__version__,
            run_id=cfg.run_id,
            sync=cfg.sync.mode,
            task=cfg.task.name,
            device=str(device),
        ).set(1)
        return trainer, outer

    def _final_checkpoint(self, trainer: Trainer, outer: OuterStep) -> None:
        trainer._apply_pending()  # the trainer thread has stopped: apply the last outer update
        if self.config.checkpoint.dir is None:
            return
        try:
            # The thread has stopped: the trainer's tensors are saved as they are, not copied.
            state = trainer.state_dict(copy_tensors=False)
            checkpoint.save_node(self.config, outer.next_round, state, outer, faults=self.faults)
        except OSError as exc:
            log.error("could not write the final checkpoint: %s", exc)

    # -- training and outer steps --------------------------------------------------------------

    async def _train(self, trainer: Trainer, runner: RoundRunner) -> None:
        cfg = self.config
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
                    if isinstance(thread.exception(), RankLost):
                        failure = thread.exception()
                        log.error("stopping the node: %s", failure, exc_info=failure)
                        self.request_stop()
                        break
                    thread.result()  # re-raise a crash of the trainer thread
                    break
                if getter not in done:
                    break
                boundary = getter.result()
                if boundary.state is not None:
                    await asyncio.to_thread(
                        checkpoint.save_node,
                        cfg,
                        boundary.outer_step + runner.view.round_offset,
                        boundary.state,
                        runner.outer,
                        faults=self.faults,
                    )
                round_task = asyncio.ensure_future(self._round(boundary, trainer, runner))
                try:
                    await self._await_round(round_task)
                except Exception:  # a bug in one round must not end the node
                    log.exception("round %d failed on our side; training on", self.next_round)
                    self._round_crashed(boundary, trainer, runner)
                else:
                    if round_task.cancelled():  # abandoned at a stop: the final checkpoint next
                        self._round_crashed(boundary, trainer, runner, counted=False)
                if cfg.sync.rounds and self.next_round >= cfg.sync.rounds:
                    log.info("finished %d rounds", cfg.sync.rounds)
                    self.request_stop()
        finally:
            self._train_stop.set()
            await asyncio.wait({thread})  # the thread checks the stop flag every inner step
            failure = None if thread.cancelled() else thread.exception()
            if failure is not None and not isinstance(failure, RankLost):
                log.error("the trainer thread failed", exc_info=failure)

    async def _await_round(self, task: asyncio.Future[Any]) -> None:
        """Wait for the round in flight. A stop gives it half of ``shutdown_grace_s`` (counted
        from the stop request; the other half is for the checkpoint and the teardown), then
        cancels it and waits for it to unwind (the caller then hands the trainer what the outer
        state holds, ``_round_crashed``). Re-raises the round's own error."""
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

    async def _round(self, b: Boundary, trainer: Trainer, runner: RoundRunner) -> None:
        """One round: run it, hand its update to the trainer, report it."""
        outcome = await runner.run(b)
        self.reporter.sync_metrics(trainer)
        # phi is not changed in place before the trainer has applied it (the next round may
        # write its step over it: prepare comes after the next boundary, which waits for this).
        trainer.deliver(b.outer_step, outcome.phi, b.theta)
        self._delivered = b.outer_step
        self._advance(outcome.round + 1, runner)
        await self.reporter.round_done(self.peer_id, b, outcome)
        self._after_round(b, trainer, runner)
        alloc = self.config.trainer
        if alloc.malloc_mmap_threshold > 0 or alloc.malloc_trim_threshold > 0:
            # The round's buffers, kept in the heaps while it ran; off the loop (it walks them).
            await asyncio.to_thread(release_free_memory)

    def _after_round(self, b: Boundary, trainer: Trainer, runner: RoundRunner) -> None:
        """Say what the diagnosis found (log, status, metric) and put the round's figures in
        our record for ``locoswarm swarm`` (published with the next announce)."""
        problems = self.diagnosis.check()
        causes = {p.cause for p in problems}
        for cause in CAUSES:
            self.metrics.misconfigured.labels(cause=cause).set(int(cause in causes))
        handler = runner.handler
        handler.problems = tuple(p.message for p in problems)
        self.info["problems"] = list(handler.problems)
        if self.reporter.val_loss is not None:
            handler.val_loss = self.reporter.val_loss
        runner.record = dataclasses.replace(
            runner.record,
            stats=PeerStats(
                train_loss=b.loss,
                val_loss=self.reporter.val_loss,
                tokens_per_s=self.reporter.tokens_per_s(trainer),
                sent_bytes=handler.bytes["sent"],
                received_bytes=handler.bytes["received"],
            ),
        )

    def _advance(self, next_round: int, runner: RoundRunner) -> None:
        self.next_round = next_round
        runner.handler.outer_step = next_round

    def _round_crashed(
        self, b: Boundary, trainer: Trainer, runner: RoundRunner, *, counted: bool = True
    ) -> None:
        """A round ended by an unexpected error of ours (counted), or abandoned at a stop: let
        the trainer go on. The outer state is swapped as one value, so it is the last round's
        (noloco until it finishes), or one that already holds this round's step (diloco and ef
        swap in their solo result when they prepare; any mode once it finished): then the
        trainer gets that phi as from a finished round, so the step is counted once. Otherwise
        theta keeps its progress (the next round's pseudo-gradient carries this one's)."""
        if counted:
            self.metrics.exchanges.labels(result="error").inc()
        if self._delivered != b.outer_step:
            r = b.outer_step + runner.view.round_offset
            trainer.deliver(b.outer_step, runner.outer.phi_after(r, b.theta), b.theta)
            self._delivered = b.outer_step
            self._advance(max(self.next_round, r + 1), runner)


def build_trainer(cfg: NodeConfig, data_seed: int, ranks: Ranks | None = None) -> Trainer:
    """The node's trainer: its task (this rank's data stream), model and inner optimizer."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every node of the run
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    task = TaskFactory(cfg.task).build(replica=rank, num_replicas=world, seed=data_seed)
    device = pick_device(cfg.trainer.device) if ranks is None else ranks.device
    total = cfg.sync.rounds * cfg.sync.inner_steps if cfg.sync.rounds else None
    return Trainer(
        task,
        cfg.trainer.inner,
        inner_steps=cfg.sync.inner_steps,
        total_steps=total,
        device=device,
        tokens_per_step=cfg.task.batch_size * cfg.task.seq_len * world,
        eval_every=cfg.trainer.eval_every,
        ranks=ranks,
    )


def follow(cfg: NodeConfig, ranks: Ranks) -> int:
    """A follower rank of a node: train as rank 0 says until it says stop."""
    trainer = build_trainer(cfg, int(ranks.objects(None)), ranks)
    try:
        trainer.follow()
    except RankLost as exc:
        log.error("rank %d: %s", ranks.rank, exc)
        return 1
    return 0


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
