"""Shared block arithmetic for the blockwise codecs (int8, int4, sign).

A flat tensor of ``n`` elements is cut into ``n // B`` full blocks of ``B`` elements and, when
``B`` does not divide ``n``, one shorter tail block. Codecs work on at most two 2-D views (full
blocks, tail) so every operation is vectorised and nothing is padded or copied. This module knows
nothing about payload layouts or the network.
"""

from __future__ import annotations

from torch import Tensor

from locoswarm.compression.encoded import MAX_BLOCK_SIZE
from locoswarm.errors import ConfigError

__all__ = ["block_views", "check_block_size", "num_blocks"]


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (full ones plus a partial tail) covering ``numel`` elements."""
    return -(-numel // block_size)


def block_views(flat: Tensor, block_size: int) -> list[Tensor]:
    """2-D views of contiguous 1-D ``flat``: ``[full (rows, B)]`` then ``[tail (1, n % B)]``.

    Either is omitted when empty, so an empty tensor gives ``[]``. Row ``i`` of the
    concatenation is block ``i``.
    """
    numel = flat.numel()
    full = numel // block_size
    views = []
    if full:
        views.append(flat[: full * block_size].view(full, block_size))
    if numel > full * block_size:
        views.append(flat[full * block_size :].view(1, -1))
    return views


def check_block_size(codec: str, block_size: int) -> None:
    """Raise ``ConfigError`` unless ``block_size`` is an int in ``[1, MAX_BLOCK_SIZE]``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ConfigError(f"codec {codec}: block_size must be an int, got {block_size!r}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ConfigError(
            f"codec {codec}: block_size {block_size} is outside [1, {MAX_BLOCK_SIZE}]"
        )
