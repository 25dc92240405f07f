"""DiLoCo outer-step maths: the outer gradient, its group mean and the two outer optimizers.

Pure functions on tensors. Every function returns new tensors and never writes into its inputs;
callers own the state (phi, momentum buffer) and keep it in fp32. This module knows nothing about
peers, sockets, asyncio, codecs or when an outer step happens: it gets tensors that are already
gathered and decoded, and hands back the updated ones.

Sign convention (``algorithms.md`` §0): ``outer_grad = phi - theta`` (DiLoCo, a descent
direction used as a gradient). NoLoCo's ``delta = theta - phi`` lives in ``noloco.py``.

Sources: DiLoCo arXiv:2311.08105 Alg. 1 (outer optimizer ``torch.optim.SGD(nesterov=True)``);
the heavy-ball variant is the "DiLoCo" baseline of the NoLoCo repository
(``jkolehm/noloco`` ``src/noloco/pipeline_diloco_optimizer.py``, NL-dil in ``algorithms.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from locoswarm.errors import ConfigError

__all__ = [
    "DiLoCoConfig",
    "diloco_outer_step",
    "group_mean",
    "heavy_ball_outer_step",
    "nesterov_outer_step",
    "outer_grad",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """Knobs of the DiLoCo outer step (``algorithms.md`` §2)."""

    inner_steps: int = 500
    """H: inner optimizer steps between two outer steps (DiLoCo paper: 500)."""
    lr: float = 0.7
    """Outer learning rate applied to the averaged outer gradient (phi - theta)."""
    momentum: float = 0.9
    """Outer momentum coefficient; 0 disables momentum."""
    nesterov: bool = True
    """True: torch ``SGD(nesterov=True)`` as in the DiLoCo paper. False: the heavy-ball form of
    the NoLoCo repository's DiLoCo baseline (NL-dil)."""
    group_size: int | None = None
    """Replicas averaged per outer step; None means all replicas (classic DiLoCo)."""

    def __post_init__(self) -> None:
        if self.inner_steps <= 0:
            raise ConfigError(f"diloco.inner_steps must be > 0, got {self.inner_steps}")
        if not self.lr > 0:
            raise ConfigError(f"diloco.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"diloco.momentum must be in [0, 1), got {self.momentum}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"diloco.group_size must be None or >= 1, got {self.group_size}")


def outer_grad(phi: Tensor, theta: Tensor) -> Tensor:
    """Outer (pseudo-)gradient of one replica, DiLoCo sign.

    Args:
        phi: Slow weights at the last outer step.
        theta: Fast weights after the inner steps.

    Returns:
        A new tensor ``phi - theta``.
    """
    return phi - theta


def group_mean(tensors: Sequence[Tensor]) -> Tensor:
    """Mean of same-shaped tensors, summed in the given order and then divided by the count.

    The summation order is fixed so every member of a group that passes the same list in the same
    order gets the same bits.

    Args:
        tensors: At least one tensor; all of the same shape.

    Returns:
        A new tensor ``(t_0 + t_1 + ... + t_{n-1}) / n``.

    Raises:
        ValueError: If ``tensors`` is empty or the shapes differ.
    """
    if len(tensors) == 0:
        raise ValueError("group_mean needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"group_mean: shape {tuple(t.shape)} != {tuple(first.shape)}")
    total = first.clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors))


def nesterov_outer_step(
    phi: Tensor,
    outer_grad_mean: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """One outer step of ``torch.optim.SGD(lr, momentum, nesterov=True)``, functional form.

    Dampening and weight decay are 0. The op order mirrors torch's single-tensor
    (``foreach=False``) path so the results match it bit for bit (DiLoCo arXiv:2311.08105
    Alg. 1; ``algorithms.md`` §2.1)::

        buf  = g                      on the first step (buf is None)
        buf  = momentum * buf + g     afterwards
        phi' = phi - lr * (g + momentum * buf)

    Args:
        phi: Slow weights.
        outer_grad_mean: Group mean of ``phi - theta_i`` (DiLoCo sign).
        buf: Momentum buffer from the previous outer step, or None before the first one.
        lr: Outer learning rate.
        momentum: Momentum coefficient.

    Returns:
        ``(new_phi, new_buf)``, both new tensors.
    """
    g = outer_grad_mean
    new_buf = g.clone() if buf is None else buf.mul(momentum).add(g, alpha=1)
    step = g.add(new_buf, alpha=momentum)
    return phi.add(step, alpha=-lr), new_buf


def heavy_ball_outer_step(
    phi: Tensor,
    outer_grad_mean: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """One heavy-ball (Polyak) outer step, the NoLoCo repository's "DiLoCo" (NL-dil).

    ``pipeline_diloco_optimizer.py`` lines 95-98 (its comment says Nesterov, the maths is
    Polyak)::

        gm   = momentum * gm - lr * g     (gm = 0 when buf is None)
        phi' = phi + gm

    Args:
        phi: Slow weights.
        outer_grad_mean: Group mean of ``phi - theta_i`` (DiLoCo sign).
        buf: The running ``gm`` from the previous outer step, or None before the first one.
        lr: Outer learning rate.
        momentum: Momentum coefficient.

    Returns:
        ``(new_phi, new_buf)``, both new tensors.
    """
    scaled = lr * outer_grad_mean
    new_buf = -scaled if buf is None else momentum * buf - scaled
    return phi + new_buf, new_buf


def diloco_outer_step(
    phi: Tensor,
    outer_grad_mean: Tensor,
    buf: Tensor | None,
    cfg: DiLoCoConfig,
) -> tuple[Tensor, Tensor]:
    """One DiLoCo outer step with the optimizer ``cfg.nesterov`` selects.

    Args:
        phi: Slow weights.
        outer_grad_mean: Group mean of ``phi - theta_i`` (DiLoCo sign).
        buf: Momentum buffer from the previous outer step, or None before the first one.
        cfg: Outer-step configuration; ``lr`` and ``momentum`` are used.

    Returns:
        ``(new_phi, new_buf)``, both new tensors.
    """
    step = nesterov_outer_step if cfg.nesterov else heavy_ball_outer_step
    return step(phi, outer_grad_mean, buf, lr=cfg.lr, momentum=cfg.momentum)
