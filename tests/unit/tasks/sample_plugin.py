"""A user task in plugin form, for tests: linear regression on seeded random data."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _batches(replica: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed * 100 + replica)
    w = torch.arange(4, dtype=torch.float32)
    while True:
        x = torch.randn(8, 4, generator=gen)
        yield x, x @ w


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    out: Tensor = ((model(x).squeeze(-1) - y) ** 2).mean()
    return out


def make(*, replica: int, num_replicas: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 999)
    val = [(x := torch.randn(8, 4, generator=gen), x @ torch.arange(4.0))]
    return nn.Linear(4, 1), _batches(replica, seed), _loss, val


def not_a_task(*, replica: int, num_replicas: int, seed: int) -> str:
    return "nope"
