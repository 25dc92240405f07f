"""Blockwise absmax integer quantization: int8 and int4 (``compression.md`` §4.3, T3).

Per block ``b`` of ``block_size`` elements: ``s_b = absmax_b / qmax`` stored as float32,
``q = round(x / s_b)`` (``torch.round``: half to even) clamped to ``[-qmax, qmax]``, and
``x_hat = q * s_b``, so ``|x - x_hat| <= s_b / 2``. An all-zero block has scale 0 and codes 0.

Payloads (``nb = ceil(n / block_size)``):

- int8 (``qmax = 127``): ``n`` int8 codes, then ``nb`` float32 scales.
- int4 (``qmax = 7``): ``ceil(n / 2)`` bytes holding ``q + 8`` (1..15) as nibbles, element
  ``2i`` in the low nibble and ``2i + 1`` in the high nibble, an odd count padded with a zero high
  nibble; then ``nb`` float32 scales. Nibble 0 (``q = -8``) is never written and is rejected.

This module knows nothing about error feedback, the network, or which algorithm sends the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from locoswarm.compression.blocks import block_views, check_block_size, num_blocks
from locoswarm.compression.encoded import (
    DEFAULT_LIMITS,
    MAX_BLOCK_SIZE,
    DecodeLimits,
    Encoded,
    HeaderCheck,
    check_finite,
    dtype_name,
    flatten_input,
    read_tensor,
    tensor_bytes,
)

__all__ = ["Int4Codec", "Int8Codec"]


def _quantize_into(flat: Tensor, codes: Tensor, block_size: int, qmax: int, offset: int) -> Tensor:
    """Write ``round(x / s) + offset`` for each block of ``flat`` into ``codes``; return scales."""
    # Whole-tensor ops on purpose: a loop over cache-sized groups of blocks was 1.6x faster on an
    # idle CPU but 10x slower when another process kept the cores busy (every parallel region
    # then waits a scheduler slice at its barrier), which is the normal case beside training.
    scales = []
    for block, out in zip(
        block_views(flat, block_size), block_views(codes, block_size), strict=True
    ):
        scale = torch.linalg.vector_norm(block, ord=math.inf, dim=1).div_(qmax)
        # A zero scale would give 0/0; its block is all zeros, so divide by 1 instead.
        divisor = torch.where(scale > 0, scale, 1.0).unsqueeze(1)
        q = torch.div(block, divisor).round_().clamp_(-qmax, qmax)
        if offset:
            q.add_(offset)
        out.copy_(q)
        scales.append(scale)
    return torch.cat(scales) if scales else flat.new_empty(0)


def _dequantize(codes: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """``codes * s_b`` per block as a new float32 tensor (codes are integers, already centred)."""
    out = torch.empty(codes.numel(), dtype=torch.float32)
    row = 0
    views = zip(block_views(codes, block_size), block_views(out, block_size), strict=True)
    for block, dst in views:
        torch.mul(block, scales[row : row + block.shape[0]].unsqueeze(1), out=dst)
        row += block.shape[0]
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Int8Codec:
    """Blockwise absmax int8: ``8 + 32 / block_size`` bits per element (8.0078 at 4096)."""

    name: ClassVar[str] = "int8"
    block_size: int = 4096
    """Elements sharing one float32 scale."""

    def __post_init__(self) -> None:
        check_block_size(self.name, self.block_size)

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Quantize ``tensor``; raises ``ValueError`` if it holds NaN or Inf."""
        flat = flatten_input(tensor, codec=self.name, name=name)
        codes = torch.empty(flat.numel(), dtype=torch.int8, device=flat.device)
        scales = _quantize_into(flat, codes, self.block_size, 127, 0)
        check_finite(scales, codec=self.name, name=name, what="values")
        return Encoded(
            codec=self.name,
            shape=tuple(tensor.shape),
            dtype=dtype_name(tensor),
            payload=tensor_bytes(codes, scales),
            block_size=self.block_size,
            name=name,
        )

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode an int8 payload to float32; see ``Codec.decode``."""
        check = HeaderCheck(encoded, codec=self.name, limits=limits)
        check.require_params(block_size=(1, MAX_BLOCK_SIZE), k_per_chunk=(0, 0))
        numel, block_size = check.numel, encoded.block_size
        nb = num_blocks(numel, block_size)
        check.require_length(
            numel + 4 * nb, f"{numel} elements in blocks of {block_size} (int8 codes + fp32 scales)"
        )
        scales = read_tensor(encoded.payload, offset=numel, count=nb, dtype=torch.float32)
        check.require_scales(scales, limits)
        codes = read_tensor(encoded.payload, offset=0, count=numel, dtype=torch.int8)
        return _dequantize(codes, scales, block_size).view(encoded.shape)


@dataclass(frozen=True, kw_only=True, slots=True)
class Int4Codec:
    """Blockwise absmax int4 in nibbles: ``4 + 32 / block_size`` bits per element."""

    name: ClassVar[str] = "int4"
    block_size: int = 4096
    """Elements sharing one float32 scale."""

    def __post_init__(self) -> None:
        check_block_size(self.name, self.block_size)

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Quantize ``tensor`` to 4 bits; raises ``ValueError`` if it holds NaN or Inf."""
        flat = flatten_input(tensor, codec=self.name, name=name)
        numel = flat.numel()
        num_pairs = -(-numel // 2)
        nibbles = torch.zeros(2 * num_pairs, dtype=torch.uint8, device=flat.device)
        scales = _quantize_into(flat, nibbles[:numel], self.block_size, 7, 8)
        check_finite(scales, codec=self.name, name=name, what="values")
        pairs = nibbles.view(num_pairs, 2)
        packed = pairs[:, 1].bitwise_left_shift(4).bitwise_or_(pairs[:, 0])
        return Encoded(
            codec=self.name,
            shape=tuple(tensor.shape),
            dtype=dtype_name(tensor),
            payload=tensor_bytes(packed, scales),
            block_size=self.block_size,
            name=name,
        )

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode an int4 payload to float32; see ``Codec.decode``."""
        check = HeaderCheck(encoded, codec=self.name, limits=limits)
        check.require_params(block_size=(1, MAX_BLOCK_SIZE), k_per_chunk=(0, 0))
        numel, block_size = check.numel, encoded.block_size
        nb, num_pairs = num_blocks(numel, block_size), -(-numel // 2)
        check.require_length(
            num_pairs + 4 * nb,
            f"{numel} elements in blocks of {block_size} (packed nibbles + fp32 scales)",
        )
        scales = read_tensor(encoded.payload, offset=num_pairs, count=nb, dtype=torch.float32)
        check.require_scales(scales, limits)
        packed = read_tensor(encoded.payload, offset=0, count=num_pairs, dtype=torch.uint8)
        nibbles = torch.empty(num_pairs, 2, dtype=torch.uint8)
        torch.bitwise_and(packed, 15, out=nibbles[:, 0])
        torch.bitwise_right_shift(packed, 4, out=nibbles[:, 1])
        flat = nibbles.view(-1)
        if numel % 2 and int(flat[-1]) != 0:
            raise check.error("padding nibble after the last element is not zero")
        codes = flat[:numel]
        if bool((codes == 0).any()):
            raise check.error("nibble 0 (q = -8) is not a valid int4 code")
        centred = codes.view(torch.int8).sub(8)
        return _dequantize(centred, scales, block_size).view(encoded.shape)
