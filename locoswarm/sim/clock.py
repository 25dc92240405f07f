"""Simulated wall clock of a swarm: compute time per replica and blocking transfers.

Models replicas of different speeds and a network of fixed latency and bandwidth, so that a run can
report how long each replica would have waited. Knows nothing about tensors or algorithms: callers
say who synchronises with whom and how many bytes each member sends.
"""

from __future__ import annotations

from collections.abc import Sequence

from locoswarm.sim.config import NetworkModel


class SimClock:
    """Per-replica simulated time, compute seconds and idle seconds."""

    def __init__(self, num_replicas: int, net: NetworkModel) -> None:
        speeds = net.speeds or (1.0,) * num_replicas
        self._net = net
        self.step_time_s = [net.step_time_s / s for s in speeds]
        self.now_s = [0.0] * num_replicas
        self.compute_s = [0.0] * num_replicas
        self.idle_s = [0.0] * num_replicas

    def compute(self, replica: int, steps: int) -> None:
        """Replica ``replica`` runs ``steps`` inner steps."""
        dt = steps * self.step_time_s[replica]
        self.now_s[replica] += dt
        self.compute_s[replica] += dt

    def sync(self, members: Sequence[int], *, bytes_per_member: float, hops: int) -> None:
        """A blocking exchange among ``members``: it starts when the last member is ready.

        Each member sends ``bytes_per_member`` over its own link in ``hops`` sequential messages
        (a pair swap is one hop; a ring all-reduce over n members is 2(n-1) hops). Every member
        leaves at the same time; the wait and the transfer count as idle time.
        """
        if len(members) < 2:
            return
        start = max(self.now_s[m] for m in members)
        end = (
            start + hops * self._net.latency_s + bytes_per_member / self._net.bandwidth_bytes_per_s
        )
        for m in members:
            self.idle_s[m] += end - self.now_s[m]
            self.now_s[m] = end

    def idle_fraction(self, replica: int) -> float:
        """Share of the replica's elapsed simulated time spent not computing."""
        total = self.now_s[replica]
        return self.idle_s[replica] / total if total > 0 else 0.0
