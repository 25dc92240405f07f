"""Prometheus metrics of one node (the only module that imports prometheus_client).

Names follow ``locoswarm_<subsystem>_<what>_<unit>``; labels have bounded values (never a peer
id). Bandwidth and idle fraction come from ``rate()`` over the counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from locoswarm.protocol.reasons import REASONS

EXCHANGE_RESULTS = ("ok", "solo", "failed", "refused", "error")
"""error: a fault of our own (a bug) ended the round; it is logged with its traceback."""
CAUSES = ("secret", "fingerprint", "sync", "version", "run")
"""Misconfigurations a node can diagnose from what its peers publish and how they refuse it."""
DISTANCE_BUCKETS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
CLIP_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 100.0)


PATHS = ("grpc", "libp2p", "relayed")
"""How an exchange travels: direct gRPC, a libp2p stream (direct or hole-punched), or a relay."""


class NodeMetrics:
    """One registry per daemon, so several nodes can live in one process (tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_* (CPU, resident memory, open fds)
        r.register(PLATFORM_COLLECTOR)
        self.info = Gauge(
            "locoswarm_node_info",
            "Constant 1, labelled with what this node runs",
            ["version", "run_id", "sync", "task", "device"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "locoswarm_protocol_sent_bytes", "Payload bytes sent, by kind", ["kind"], registry=r
        )
        self.bytes_received = Counter(
            "locoswarm_protocol_received_bytes",
            "Payload bytes received, by kind",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "locoswarm_protocol_rejected",
            "Calls or payloads refused, by reason",
            ["reason"],
            registry=r,
        )
        self.compute_seconds = Counter(
            "locoswarm_trainer_compute_seconds", "Seconds spent in inner steps", registry=r
        )
        self.idle_seconds = Counter(
            "locoswarm_trainer_idle_seconds",
            "Seconds the trainer waited for an outer step",
            registry=r,
        )
        self.inner_steps = Counter("locoswarm_trainer_inner_steps", "Inner steps", registry=r)
        self.tokens = Counter("locoswarm_trainer_tokens", "Tokens trained on", registry=r)
        self.device_memory_peak = Gauge(
            "locoswarm_trainer_device_memory_peak_bytes",
            "Peak memory allocated on the training device (torch.cuda.max_memory_allocated); "
            "0 on CPU",
            registry=r,
        )
        self.loss = Gauge(
            "locoswarm_trainer_loss", "Mean training loss of the last round", registry=r
        )
        self.loss.set(float("nan"))  # no round yet: not a perfect loss of 0
        self.val_loss = Gauge(
            "locoswarm_trainer_validation_loss",
            "Loss of the outer weights on the task's held-out batches (every trainer.eval_every "
            "rounds)",
            registry=r,
        )
        self.val_loss.set(float("nan"))
        self.distance = Histogram(
            "locoswarm_sync_partner_distance",
            "Relative RMS distance between our outer weights and an exchange partner's, from the "
            "exchanged messages (the swarm's disagreement)",
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )
        self.clip_ratio = Histogram(
            "locoswarm_sync_clip_ratio",
            "A pair partner's distance from our message over the clipping threshold, per "
            "tensor (above 1: the partner's contribution was clipped)",
            buckets=CLIP_BUCKETS,
            registry=r,
        )
        self.clipped = Counter(
            "locoswarm_sync_clipped",
            "Partner messages clipped toward ours before the mean (self-centred clipping)",
            registry=r,
        )
        self.banned = Counter(
            "locoswarm_peers_banned",
            "Peers banned, by why (clipped: repeated clipped messages)",
            ["cause"],
            registry=r,
        )
        self.banned.labels(cause="clipped")
        self.misconfigured = Gauge(
            "locoswarm_node_misconfigured",
            "1 while this node diagnoses a misconfiguration of its own, by cause",
            ["cause"],
            registry=r,
        )
        self.excluded = Gauge(
            "locoswarm_peers_excluded",
            "Peers in the run's records that are never matched, by cause",
            ["cause"],
            registry=r,
        )
        for cause in CAUSES:
            self.misconfigured.labels(cause=cause).set(0)
            self.excluded.labels(cause=cause).set(0)
        self.outer_step = Gauge("locoswarm_sync_outer_step", "Outer steps completed", registry=r)
        self.reachable = Gauge(
            "locoswarm_node_reachable",
            "1 when a peer dialled this node's gRPC address at start, 0 when none could (or in "
            "client mode), -1 untested",
            registry=r,
        )
        self.reachable.set(-1)
        self.loop_lag = Histogram(
            "locoswarm_node_event_loop_lag_seconds",
            "How late the event loop woke a timer (work that blocks the loop shows here)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.path_bytes = Counter(
            "locoswarm_protocol_path_bytes",
            "Exchange payload bytes by path (grpc, libp2p, relayed) and direction",
            ["path", "direction"],
            registry=r,
        )
        self.exchange_paths = Counter(
            "locoswarm_sync_exchange_paths",
            "Completed exchanges by the path they took (grpc, libp2p, relayed)",
            ["path"],
            registry=r,
        )
        self.exchanges = Counter(
            "locoswarm_sync_exchanges", "Outer steps by how they ended", ["result"], registry=r
        )
        self.exchange_seconds = Histogram(
            "locoswarm_sync_exchange_seconds",
            "Duration of an outer step (matchmaking, transfer, update), by how it ended",
            ["result"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.peers = Gauge("locoswarm_peers_live", "Live compatible peers in our view", registry=r)
        for result in EXCHANGE_RESULTS:
            self.exchanges.labels(result=result)
            self.exchange_seconds.labels(result=result)
        for kind in ("exchange", "state"):
            self.bytes_sent.labels(kind=kind)
            self.bytes_received.labels(kind=kind)
        for path in PATHS:
            self.exchange_paths.labels(path=path)
            for direction in ("sent", "received"):
                self.path_bytes.labels(path=path, direction=direction)
        for reason in REASONS:  # every series exists from the start (dashboards, alerts)
            self.rejected.labels(reason=reason)
        self._server: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint in a thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
