"""A task whose global batch is the same whatever the node's ranks: each step draws one batch
of ``GLOBAL_BATCH`` rows from the step number, and rank ``replica`` of ``num_replicas`` takes its
contiguous share of the rows. A one-rank node and a two-rank node then train on the same global
batch, so DDP's gradient average equals the one-rank gradient (up to rounding).

Used as ``--task tests.integration.rank_task:task`` (the nodes run from the repository root).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

GLOBAL_BATCH = 16
FEATURES = 8


def _batches(replica: int, num_replicas: int) -> Iterator[tuple[Tensor, Tensor]]:
    rows = GLOBAL_BATCH // num_replicas
    step = 0
    while True:
        gen = torch.Generator().manual_seed(10_000 + step)
        x = torch.randn(GLOBAL_BATCH, FEATURES, generator=gen)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        lo = replica * rows
        yield x[lo : lo + rows], y[lo : lo + rows]
        step += 1


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def task(*, replica: int, num_replicas: int, seed: int) -> tuple[object, ...]:
    """(model, batches, loss, validation batches); the seed is not used (the data is fixed)."""
    if GLOBAL_BATCH % num_replicas:
        raise ValueError(f"{num_replicas} ranks do not divide a batch of {GLOBAL_BATCH}")
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(1)
    xv = torch.randn(GLOBAL_BATCH, FEATURES, generator=gen)
    val = [(xv, torch.sin(xv.sum(dim=1, keepdim=True)))]
    return model, _batches(replica, num_replicas), _loss, val
