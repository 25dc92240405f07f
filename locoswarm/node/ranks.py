"""A node of several local ranks (one per GPU): the launcher, and rank 0's control of the others.

``locoswarm run --nproc-per-node N`` hands the command to torch.distributed's elastic launcher
(the launcher behind ``torchrun``, run in this process): it starts N worker processes of the same
command line, each with ``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous on 127.0.0.1. Running
``torchrun --nproc-per-node N -m locoswarm run ...`` works as well. Rank 0 runs the
daemon: network identity, DHT, gRPC, outer state, metrics and checkpoints. The other ranks
(followers) only train: every rank wraps the same model in DDP, so each inner step averages the
ranks' gradients and every rank holds the same weights, trained on its own data stream.

Rank 0's trainer thread drives the followers with one small broadcast before each thing they do
together (``Control``): an inner step, an outer update to apply (its difference is broadcast, so
every rank applies the same bits at the same step, one phase late as on a one-rank node), the
trainer state to load at the start (restore, late join), gathering their data positions for a
checkpoint, and stop. A rank that dies breaks the next collective: rank 0 stops the node
(checkpoint, DHT record withdrawn) and the launcher ends the others; a restart resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from locoswarm.errors import ConfigError

log = logging.getLogger("locoswarm.node.ranks")

__all__ = ["Control", "RankLost", "Ranks", "launch", "note_stop_signal", "under_launcher"]


class Control(enum.IntEnum):
    """What rank 0 asks the followers to do next."""

    STEP = 0
    ADD = 1
    """theta += the broadcast difference (an overlapped outer update)."""
    SET = 2
    """theta = the broadcast weights (a blocking outer update)."""
    STATE = 3
    """Send rank 0 your data position (for a checkpoint)."""
    LOAD = 4
    """Load the broadcast trainer state (the start: a checkpoint or a late join)."""
    STOP = 5


class RankLost(RuntimeError):
    """A collective with the node's other ranks failed: one of them died or stopped answering."""


def under_launcher() -> bool:
    """Whether this process is one of a launched node's ranks (ours, or a ``torchrun``'s)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(argv: Sequence[str], nproc: int, *, shutdown_timeout_s: float) -> int:
    """Run ``locoswarm <argv>`` as ``nproc`` local ranks and wait for them; returns the exit
    status. A SIGTERM or SIGINT to this process goes to every rank: rank 0 stops the node
    gracefully and tells the others to stop."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # every rank is on this machine
    options: dict[str, Any] = {}
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        options["shutdown_timeout"] = max(1, int(shutdown_timeout_s))  # torch 2.10 on
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"locoswarm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
        local_addr="127.0.0.1",
        **options,
    )
    try:
        # A function, not a command: the ranks are this process's children in its own process
        # group (a command would put each in a session of its own), so stopping or killing
        # the node's process group reaches every rank.
        elastic_launch(config, _rank_main)(list(argv))
    except ChildFailedError as exc:
        failures = exc.failures
        first = min(failures.values(), key=lambda f: f.timestamp) if failures else None
        what = f"rank {first.local_rank} exited with status {first.exitcode}" if first else "a rank"
        print(f"locoswarm: a rank of this node failed: {what}; the node stopped", file=sys.stderr)
        return 1
    except SignalException as exc:
        print(f"locoswarm: stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr)
        return 0
    return 0


_signalled = threading.Event()


def note_stop_signal(*_: object) -> None:
    """A stop signal reached this rank (the launcher sends one to every rank when it stops)."""
    _signalled.set()


def _rank_main(argv: list[str]) -> None:
    """One rank: the same ``locoswarm`` command line, in a fresh interpreter."""
    from locoswarm.node.cli import main

    code = main(argv)
    if _signalled.is_set():
        # The launcher is stopping on a signal: it reads no return values, and the launcher's
        # wrapper would wait for it to. The node has stopped (checkpoint written): exit now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


class Ranks:
    """This process's place among the node's ranks and the collectives between them."""

    def __init__(self, *, timeout_s: float, device_name: str) -> None:
        self.rank = int(os.environ["LOCAL_RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        if self.world != int(os.environ.get("LOCAL_WORLD_SIZE", self.world)):
            raise ConfigError(
                "a locoswarm node's ranks run on one machine (other machines join the swarm as "
                f"nodes of their own): WORLD_SIZE {self.world}, LOCAL_WORLD_SIZE "
                f"{os.environ.get('LOCAL_WORLD_SIZE')}"
            )
        cuda = torch.cuda.is_available() and device_name != "cpu"
        if cuda:
            self.device = torch.device("cuda", self.rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if cuda else "gloo"
        dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.live = True
        """False once the followers stopped (or one died): no more collectives."""
        self.lost = False
        """A collective failed: a rank died or stopped answering."""
        log.info(
            "rank %d of %d (%s, %s), pid %d",
            self.rank,
            self.world,
            self.backend,
            self.device,
            os.getpid(),
        )

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def lost_rank(self) -> None:
        self.live, self.lost = False, True

    # -- collectives (every rank calls the same ones in the same order) ---------------------------

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        if not self.live:
            raise RankLost(f"{what}: the node's other ranks are gone")
        try:
            return fn(*args)
        except (RuntimeError, dist.DistBackendError) as exc:
            self.lost_rank()
            raise RankLost(f"{what} with the node's other ranks failed: {exc}") from exc

    def _comm(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

    def control(self, op: Control | None = None) -> Control:
        """Rank 0 sends ``op``; a follower receives it."""
        t = self._comm(torch.tensor([-1 if op is None else int(op)], dtype=torch.int64))
        self._call("control", dist.broadcast, t, 0)
        value = int(t.item())
        if value not in Control._value2member_map_:
            raise RankLost(f"control: unknown operation {value} from rank 0")
        return Control(value)

    def tensor(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank (followers pass a buffer of the same shape and dtype)."""
        buf = self._comm(t)
        self._call("broadcast", dist.broadcast, buf, 0)
        return buf.cpu() if buf is not t else t

    def objects(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the node's own processes: pickled, never peer data)."""
        box = [obj]
        self._call("broadcast", dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the others)."""
        out: list[Any] | None = [None] * self.world if self.leader else None
        self._call("gather", dist.gather_object, obj, out, 0)
        return out

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as DDP: every backward pass averages the ranks' gradients."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Every rank computes the same buffers: no buffer broadcast before each forward
        # (``forward_sync_buffers`` from torch 2.13 on, ``broadcast_buffers`` before it).
        sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        return self._call(  # type: ignore[no-any-return]
            "DDP setup", lambda: DistributedDataParallel(model, device_ids=ids, **sync)
        )


def check_nproc(nproc: int, device: str) -> None:
    """More ranks than GPUs is a mistake on a GPU machine (CPU ranks are for tests)."""
    if nproc > 1 and device != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if nproc > count:
            raise ConfigError(
                f"trainer.nproc_per_node {nproc}: this machine has {count} GPU(s); "
                "use at most one rank per GPU (or --device cpu)"
            )
