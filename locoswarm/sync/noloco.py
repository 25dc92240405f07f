"""NoLoCo outer-step maths: momentum update with a pull toward the random group's slow weights.

Pure functions on tensors. Every function returns new tensors and never writes into its inputs;
callers own phi and delta and keep them in fp32. This module knows nothing about who the group
members are, how they were drawn (see ``pairing.py``), how their tensors arrived, or what to do
when a partner fails: it gets the group's tensors, already gathered and decoded.

Sign convention: NoLoCo's ``delta = theta - phi`` (fast minus slow), the sign of the reference
code, which is the opposite of DiLoCo's ``outer_grad = phi - theta``.

Source: Kolehmainen et al., "NoLoCo", arXiv:2506.10911, §3.2 Eq. 1-3, with the sign of the beta
term taken from the reference code (``jkolehm/noloco`` ``src/noloco/sparse_optimizer_c.py``
``outer_step``) and the paper's appendix (Eq. 32, 43), not from Eq. 2 as printed
(``algorithms.md`` §1.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from locoswarm.errors import ConfigError
from locoswarm.sync.diloco import group_mean

__all__ = ["NoLoCoConfig", "noloco_outer_step", "noloco_step_from_means"]

_CHUNK = 1 << 16
"""``noloco_step_from_means`` works through this many elements at a time."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoLoCoConfig:
    """Knobs of the NoLoCo outer step (``algorithms.md`` §1.6)."""

    inner_steps: int = 50
    """H: inner optimizer steps between two outer steps (NoLoCo paper: 50)."""
    alpha: float = 0.5
    """Outer momentum coefficient (the paper's "Nesterov momentum parameter")."""
    beta: float = 0.7
    """Outer learning rate applied to the group-mean delta (theta - phi)."""
    gamma: float | None = None
    """Pull toward the group's mean slow weights. None means gamma == beta, the coupling of the
    reference code (the paper states no value)."""
    group_size: int = 2
    """Members per random group, this node included (paper: 2)."""

    def __post_init__(self) -> None:
        if self.inner_steps <= 0:
            raise ConfigError(f"noloco.inner_steps must be > 0, got {self.inner_steps}")
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"noloco.alpha must be in [0, 1), got {self.alpha}")
        if not self.beta > 0:
            raise ConfigError(f"noloco.beta must be > 0, got {self.beta}")
        if self.gamma is not None and not self.gamma >= 0:
            raise ConfigError(f"noloco.gamma must be None or >= 0, got {self.gamma}")
        if self.group_size < 1:
            raise ConfigError(f"noloco.group_size must be >= 1, got {self.group_size}")

    @property
    def effective_gamma(self) -> float:
        """The gamma actually used: ``gamma``, or ``beta`` when ``gamma`` is None."""
        return self.beta if self.gamma is None else self.gamma

    @property
    def theta_only(self) -> bool:
        """True when gamma equals beta, so only theta has to go on the wire."""
        return self.gamma is None or self.gamma == self.beta


def noloco_outer_step(
    phi: Tensor,
    delta: Tensor,
    thetas: Sequence[Tensor],
    phis: Sequence[Tensor] | None,
    *,
    alpha: float,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    """One NoLoCo outer step for one node (arXiv:2506.10911 Eq. 1-3, reference-code sign).

    General form, with the group's members ``j`` (this node included, ``n = len(thetas)``)::

        delta' = alpha * delta + beta * mean_j(theta_j - phi_j) + gamma * mean_j(phi_j - phi)
        phi'   = phi + delta'

    The pull term is computed as ``mean_j(phi_j - phi)`` so that identical slow weights give
    exactly zero. The caller then sets ``theta = phi'``.

    Theta-only form (``phis is None``), exact algebra when ``gamma == beta``, which halves the
    bytes on the wire (``algorithms.md`` §1.2)::

        delta' = alpha * delta + beta * (mean_j(theta_j) - phi)

    With ``n == 1`` (only this node) the pull vanishes and the step is single-worker heavy-ball
    DiLoCo, the solo fallback when no partner is available.

    Args:
        phi: This node's slow weights.
        delta: This node's momentum; zeros before the first outer step. Private, never sent.
        thetas: Fast weights of every group member, this node included, in an order all members
            share (the summation order decides the last bits).
        phis: Slow weights of the same members in the same order, or None for the theta-only
            form.
        alpha: Momentum coefficient.
        beta: Outer learning rate.
        gamma: Pull coefficient toward the group's mean slow weights.

    Returns:
        ``(new_phi, new_delta)``, both new tensors.

    Raises:
        ValueError: If ``thetas`` is empty or ``phis`` has a different length.
        ConfigError: If ``phis`` is None while ``gamma != beta``.
    """
    if len(thetas) == 0:
        raise ValueError("noloco_outer_step needs at least this node's theta in thetas")
    if phis is None:
        if gamma != beta:
            raise ConfigError(
                f"the theta-only NoLoCo form needs gamma == beta, got gamma={gamma}, beta={beta}; "
                "pass the members' phis"
            )
        new_delta = alpha * delta + beta * (group_mean(thetas) - phi)
    else:
        if len(phis) != len(thetas):
            raise ValueError(
                f"noloco_outer_step: {len(thetas)} thetas but {len(phis)} phis; "
                "both must list every group member in the same order"
            )
        mean_delta = group_mean([t - p for t, p in zip(thetas, phis, strict=True)])
        pull = group_mean([p - phi for p in phis])
        new_delta = alpha * delta + beta * mean_delta + gamma * pull
    return phi + new_delta, new_delta


def noloco_step_from_means(
    phi: Tensor,
    delta: Tensor,
    theta_mean: Tensor,
    phi_mean: Tensor | None,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    reuse: bool = False,
    reuse_delta: bool = False,
) -> tuple[Tensor, Tensor]:
    """``noloco_outer_step(phi, delta, [theta_mean], phis, ...)`` with the group's means already
    taken (``phis`` is ``[phi_mean]``, or None for the theta-only form), bit for bit, a chunk at
    a time: no model-sized temporary besides the two results. Every element goes through the
    same operations in the same order (a mean of one tensor is that tensor: ``x / 1 == x``; a
    product or a sum of two operands is the same either way round).

    Args:
        reuse: ``theta_mean`` and ``phi_mean`` are the caller's to overwrite (a partner's
            decoded message that holds the pair's mean, read by no one afterwards): the new
            delta is computed in ``theta_mean``'s memory.
        reuse_delta: ``delta`` is the caller's to overwrite (nobody reads the old momentum
            afterwards): the new phi is computed in its memory, each chunk written after the
            new delta's chunk has read it. Otherwise nothing given is written.

    Returns:
        ``(new_phi, new_delta)``; ``new_delta`` is ``theta_mean`` itself when ``reuse``,
        ``new_phi`` is ``delta`` itself when ``reuse_delta``.

    Raises:
        ConfigError: If ``phi_mean`` is None while ``gamma != beta``.
    """
    if phi_mean is None and gamma != beta:
        raise ConfigError(
            f"the theta-only NoLoCo form needs gamma == beta, got gamma={gamma}, beta={beta}; "
            "pass the members' phis"
        )
    shapes = {tuple(t.shape) for t in (phi, delta, theta_mean)}
    if phi_mean is not None:
        shapes.add(tuple(phi_mean.shape))
    if len(shapes) != 1:
        raise ValueError(f"noloco_step_from_means: shapes differ: {sorted(shapes)}")
    flat = [t.reshape(-1) for t in (phi, delta, theta_mean)]
    if reuse and not theta_mean.is_contiguous():
        raise ValueError("noloco_step_from_means: reuse needs a contiguous theta_mean")
    p, d, tm = flat
    pm = None if phi_mean is None else phi_mean.reshape(-1)
    dtype = delta.dtype
    for t in (phi, theta_mean, phi_mean):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    if reuse and theta_mean.dtype != dtype:
        raise ValueError("noloco_step_from_means: reuse needs theta_mean of the result's dtype")
    if reuse_delta and (not delta.is_contiguous() or delta.dtype != dtype):
        raise ValueError(
            "noloco_step_from_means: reuse_delta needs a contiguous delta of the result's dtype"
        )
    new_delta = theta_mean if reuse else torch.empty(theta_mean.shape, dtype=dtype)
    new_phi = delta if reuse_delta else torch.empty(theta_mean.shape, dtype=dtype)
    out, phi_out = new_delta.reshape(-1), new_phi.view(-1)
    for i0 in range(0, out.numel(), _CHUNK):
        c = slice(i0, i0 + _CHUNK)
        x = out[c]
        if pm is None:
            # alpha * delta + beta * (theta_mean - phi)
            torch.sub(tm[c], p[c], out=x)
            x.mul_(beta).add_(d[c] * alpha)
        else:
            # alpha * delta + beta * (theta_mean - phi_mean) + gamma * (phi_mean - phi)
            torch.sub(tm[c], pm[c], out=x)
            x.mul_(beta).add_(d[c] * alpha)
            pull = pm[c].sub_(p[c]) if reuse else pm[c] - p[c]
            x.add_(pull.mul_(gamma))
        # phi + new_delta; with reuse_delta this overwrites delta's chunk, read above.
        torch.add(p[c], x, out=phi_out[c])
    return new_phi, new_delta
