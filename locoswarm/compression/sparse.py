"""Chunked top-k sparsification (``compression.md`` §2.1, §4.3, T1).

The flat tensor is cut into chunks of ``block_size`` elements (at most 65536, so a chunk-local
index fits in uint16). Each full chunk keeps its ``k_per_chunk`` largest ``|x|``; a shorter tail
chunk of ``r`` elements keeps ``ceil(k_per_chunk * r / block_size)``, so the count follows from
the header alone. Ties at the threshold go to the lowest index, which makes encoding a pure
function of the input. Dropped elements decode to 0, so ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``.

Payload: the kept values as float32, chunk by chunk in increasing index order; then the positions,
in whichever layout is smaller for ``(block_size, k_per_chunk)``:

- indices (``16 * k_per_chunk <= block_size``): one little-endian uint16 chunk-local index per
  kept value, strictly increasing within a chunk;
- bitmap (otherwise): one bit per element of the whole tensor, packed big-endian within each byte
  like the sign codec, zero padding bits at the end; each chunk has exactly its kept count set.

This module knows nothing about error feedback, the network, or which algorithm sends the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Final

import numpy as np
import torch
from torch import Tensor

from locoswarm.compression.blocks import block_views
from locoswarm.compression.encoded import (
    DEFAULT_LIMITS,
    DecodeLimits,
    Encoded,
    HeaderCheck,
    check_finite,
    dtype_name,
    flatten_input,
    read_tensor,
    tensor_bytes,
)
from locoswarm.errors import ConfigError

__all__ = ["MAX_CHUNK_SIZE", "TopKCodec", "kept_per_chunk", "uses_bitmap"]

MAX_CHUNK_SIZE: Final = 65536
"""Largest top-k chunk: chunk-local indices must fit in uint16."""


def kept_per_chunk(chunk_len: int, *, block_size: int, k_per_chunk: int) -> int:
    """Values kept by a chunk of ``chunk_len``: ``ceil(k_per_chunk * chunk_len / block_size)``."""
    return -(-k_per_chunk * chunk_len // block_size)


def uses_bitmap(*, block_size: int, k_per_chunk: int) -> bool:
    """True when a bitmap (1 bit per element) is smaller than uint16 indices (16 bits per value)."""
    return 16 * k_per_chunk > block_size


def _select(mags: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries per row of ``mags``, ascending; ties to lowest index."""
    rows, length = mags.shape
    if k == length:
        return torch.arange(length, device=mags.device).expand(rows, length).contiguous()
    top, idx = torch.topk(mags, k, dim=1, sorted=False)
    threshold = top.amin(dim=1, keepdim=True)
    idx = idx.sort(dim=1).values
    # torch.topk breaks ties arbitrarily; only rows with more than k candidates at the threshold
    # need the (slower) deterministic pick, and they are rare for real-valued data.
    tied = (mags >= threshold).sum(dim=1) > k
    if bool(tied.any()):
        tied_rows = tied.nonzero().squeeze(1)
        sub, sub_threshold = mags[tied_rows], threshold[tied_rows]
        above = sub > sub_threshold
        need = k - above.sum(dim=1, keepdim=True)
        at = sub == sub_threshold
        keep = above | (at & (at.cumsum(dim=1) <= need))
        idx[tied_rows] = keep.nonzero()[:, 1].view(-1, k)
    return idx


@dataclass(frozen=True, kw_only=True, slots=True)
class TopKCodec:
    """Chunked top-k with float32 values: about ``48 * ratio`` bits per element with indices."""

    name: ClassVar[str] = "topk"
    ratio: float = 0.01
    """Fraction of each chunk to keep, in (0, 1]; ``k_per_chunk = ceil(ratio * chunk_size)``."""
    chunk_size: int = MAX_CHUNK_SIZE
    """Elements per chunk, in [1, 65536]."""
    k_per_chunk: int = field(init=False)
    """Values kept per full chunk, derived from ``ratio`` and ``chunk_size``."""

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, float | int) or not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"codec topk: ratio must be in (0, 1], got {self.ratio!r}")
        size = self.chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CHUNK_SIZE:
            raise ConfigError(f"codec topk: chunk_size {size!r} is outside [1, {MAX_CHUNK_SIZE}]")
        # The 1e-12 shave keeps ratios like 0.07 * 100 = 7.000000000000001 from rounding up to 8.
        k = min(size, max(1, math.ceil(self.ratio * size * (1 - 1e-12))))
        object.__setattr__(self, "k_per_chunk", k)

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Keep the largest ``|x|`` of each chunk; raises ``ValueError`` on NaN or Inf."""
        flat = flatten_input(tensor, codec=self.name, name=name)
        chunk, k = self.chunk_size, self.k_per_chunk
        values, indices = [], []
        for view in block_views(flat, chunk):
            kept = kept_per_chunk(view.shape[1], block_size=chunk, k_per_chunk=k)
            mags = view.abs()
            # topk ranks NaN and Inf highest, so a non-finite input always shows up here.
            check_finite(mags.amax(), codec=self.name, name=name, what="values")
            idx = _select(mags, kept)
            values.append(view.gather(1, idx).view(-1))
            indices.append(idx)
        if not indices:
            position_bytes = b""
        elif uses_bitmap(block_size=chunk, k_per_chunk=k):
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            for mask_view, idx in zip(block_views(mask, chunk), indices, strict=True):
                mask_view.scatter_(1, idx, True)
            position_bytes = np.packbits(mask.cpu().numpy()).tobytes()
        else:
            flat_idx = torch.cat([idx.view(-1) for idx in indices])
            position_bytes = flat_idx.cpu().numpy().astype("<u2").tobytes()
        value_bytes = tensor_bytes(torch.cat(values)) if values else b""
        return Encoded(
            codec=self.name,
            shape=tuple(tensor.shape),
            dtype=dtype_name(tensor),
            payload=value_bytes + position_bytes,
            block_size=chunk,
            k_per_chunk=k,
            name=name,
        )

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode a top-k payload (zeros where nothing was kept); see ``Codec.decode``."""
        check = HeaderCheck(encoded, codec=self.name, limits=limits)
        check.require_params(block_size=(1, MAX_CHUNK_SIZE), k_per_chunk=(1, MAX_CHUNK_SIZE))
        numel, chunk, k = check.numel, encoded.block_size, encoded.k_per_chunk
        if k > chunk:
            raise check.error(f"k_per_chunk {k} exceeds the chunk length {chunk}")
        full, tail = divmod(numel, chunk)
        tail_kept = kept_per_chunk(tail, block_size=chunk, k_per_chunk=k)
        total = full * k + tail_kept
        bitmap = uses_bitmap(block_size=chunk, k_per_chunk=k)
        position_len = -(-numel // 8) if bitmap else 2 * total
        layout = "bitmap" if bitmap else "uint16 indices"
        check.require_length(
            4 * total + position_len,
            f"{numel} elements in chunks of {chunk} keeping {k} per chunk "
            f"({total} fp32 values + {layout})",
        )
        values = read_tensor(encoded.payload, offset=0, count=total, dtype=torch.float32)
        check.require_finite(values, "values", limits)
        out = torch.zeros(numel, dtype=torch.float32)
        views = block_views(out, chunk)
        counts = [k] * (full > 0) + [tail_kept] * (tail > 0)
        if bitmap:
            packed = np.frombuffer(encoded.payload, dtype=np.uint8, offset=4 * total)
            if numel % 8 and int(packed[-1]) & (0xFF >> (numel % 8)):
                raise check.error("bitmap padding bits after the last element are not zero")
            mask = torch.from_numpy(np.unpackbits(packed, count=numel)).view(torch.bool)
            for mask_view, kept in zip(block_views(mask, chunk), counts, strict=True):
                if bool((mask_view.sum(dim=1) != kept).any()):
                    raise check.error(f"a bitmap chunk does not have exactly {kept} bits set")
            return out.masked_scatter_(mask, values).view(encoded.shape)
        raw = np.frombuffer(encoded.payload, dtype="<u2", count=total, offset=4 * total)
        indices = torch.from_numpy(raw.astype(np.int64))
        start = 0
        for view, kept in zip(views, counts, strict=True):
            stop = start + view.shape[0] * kept
            idx = indices[start:stop].view(-1, kept)
            if bool((idx >= view.shape[1]).any()):
                raise check.error(f"an index is not below the chunk length {view.shape[1]}")
            if kept > 1 and bool((idx[:, 1:] <= idx[:, :-1]).any()):
                raise check.error("indices are not strictly increasing within a chunk")
            view.scatter_(1, idx, values[start:stop].view(-1, kept))
            start = stop
        return out.view(encoded.shape)
