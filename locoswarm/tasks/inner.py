"""The inner optimizer of every driver: AdamW with linear warm-up, cosine decay and clipping.

One builder serves the node's trainer thread, the simulator and the benchmarks, so an inner step
is the same computation wherever it runs. Knows nothing about outer steps or peers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from locoswarm.errors import ConfigError

__all__ = [
    "InnerConfig",
    "InnerLoop",
    "add_difference",
    "flat_params",
    "lr_factor",
    "set_flat",
    "weights_digest",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class InnerConfig:
    """The inner optimizer: AdamW with linear warm-up, cosine decay and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last inner step."""
    warmup_steps: int = 100
    """Linear warm-up length in inner steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"inner.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"inner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("inner.warmup_steps, grad_clip and weight_decay must be >= 0")


def lr_factor(inner: InnerConfig, total_steps: int | None) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (constant when open-ended)."""

    def factor(step: int) -> float:
        if step < inner.warmup_steps:
            return (step + 1) / inner.warmup_steps
        if total_steps is None:
            return 1.0
        progress = min(1.0, (step - inner.warmup_steps) / max(1, total_steps - inner.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return inner.min_lr_ratio + (1 - inner.min_lr_ratio) * cosine

    return factor


class InnerLoop:
    """A model's inner optimizer and schedule; ``step(loss)`` is one inner step."""

    def __init__(self, model: nn.Module, inner: InnerConfig, total_steps: int | None) -> None:
        self.model = model
        self.grad_clip = inner.grad_clip
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=inner.lr, betas=inner.betas, weight_decay=inner.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(inner, total_steps))

    def step(self, loss: Tensor) -> float:
        """Backward, clip, optimizer and schedule step; returns the loss value."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}


def weights_digest(weights: Tensor | Iterable[Tensor]) -> str:
    """A short hash of a weight vector (round logs, checkpoints, and their replay), or of the
    concatenation of several (a model's parameters, in order: the same digest as of their flat
    fp32 vector). Hashed in place: no copy of an fp32 CPU tensor."""
    h = hashlib.sha256()
    for t in [weights] if isinstance(weights, Tensor) else weights:
        flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        h.update(flat.numpy().data.cast("B"))
    return h.hexdigest()[:16]


def flat_params(model: nn.Module) -> Tensor:
    """A flat fp32 CPU copy of the model's parameters, written one parameter at a time into
    one buffer: no second host copy (``torch.cat`` of per-parameter copies holds both) and no
    model-sized accelerator temporary. From CUDA the buffer is pinned host memory, so each
    parameter is copied by DMA; the copies are waited for before it is returned."""
    params = [p.detach() for p in model.parameters()]
    cuda = [p.device for p in params if p.device.type == "cuda"]
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, pin_memory=bool(cuda))
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset : offset + n].copy_(p.reshape(-1), non_blocking=p.device.type == "cuda")
        offset += n
    for device in set(cuda):
        torch.cuda.current_stream(device).synchronize()
    return flat


@torch.no_grad()
def set_flat(model: nn.Module, flat: Tensor) -> None:
    """Copy a flat fp32 vector into the model's parameters (never aliasing it)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p).to(p.device, p.dtype))
        offset += n


@torch.no_grad()
def add_difference(model: nn.Module, new: Tensor, old: Tensor) -> None:
    """theta += new - old, one parameter at a time (no full-size temporary): the overlapped apply
    of an outer update that was computed from the snapshot ``old``."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        step = new[offset : offset + n] - old[offset : offset + n]
        p.add_(step.view_as(p).to(p.device, p.dtype))
        offset += n
