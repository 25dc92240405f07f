"""Scaled sign compression with one float32 scale per block (``compression.md`` §2.3, T2, T9).

Per block ``b`` of ``d`` elements: ``s_b = ||x_b||_1 / d`` (mean absolute value, the MSE-optimal
scale for a fixed sign pattern), so ``C(x) = s_b * sign(x)`` is contractive:
``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d`` per block. Bit 1 means ``x >= 0`` (sign(0) = +1, as
DeepSpeed); decoding gives ``+s_b`` or ``-s_b``.

Payload: ``ceil(n / 8)`` bytes of bits over the whole flat tensor, packed big-endian within each
byte (numpy ``packbits`` default: ``[1, 0, 1, 0] -> 0xA0``), zero padding bits at the end; then
``ceil(n / block_size)`` float32 scales. This module knows nothing about error feedback or the
network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
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

__all__ = ["SignCodec"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SignCodec:
    """Scaled sign: ``1 + 32 / block_size`` bits per element (1.0078 at 4096)."""

    name: ClassVar[str] = "sign"
    block_size: int = 4096
    """Elements sharing one float32 scale."""

    def __post_init__(self) -> None:
        check_block_size(self.name, self.block_size)

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Encode signs and per-block L1 scales; raises ``ValueError`` on NaN or Inf."""
        flat = flatten_input(tensor, codec=self.name, name=name)
        parts = [
            torch.linalg.vector_norm(block, ord=1, dim=1).div_(block.shape[1])
            for block in block_views(flat, self.block_size)
        ]
        scales = torch.cat(parts) if parts else flat.new_empty(0)
        # NaN or Inf anywhere in a block makes its L1 norm non-finite.
        check_finite(scales, codec=self.name, name=name, what="values")
        bits = np.packbits(flat.ge(0).cpu().numpy())
        return Encoded(
            codec=self.name,
            shape=tuple(tensor.shape),
            dtype=dtype_name(tensor),
            payload=bits.tobytes() + tensor_bytes(scales),
            block_size=self.block_size,
            name=name,
        )

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode a sign payload to float32 ``+-s_b``; see ``Codec.decode``."""
        check = HeaderCheck(encoded, codec=self.name, limits=limits)
        check.require_params(block_size=(1, MAX_BLOCK_SIZE), k_per_chunk=(0, 0))
        numel, block_size = check.numel, encoded.block_size
        nb, num_bytes = num_blocks(numel, block_size), -(-numel // 8)
        check.require_length(
            num_bytes + 4 * nb, f"{numel} elements in blocks of {block_size} (bits + fp32 scales)"
        )
        scales = read_tensor(encoded.payload, offset=num_bytes, count=nb, dtype=torch.float32)
        check.require_scales(scales, limits)
        packed = np.frombuffer(encoded.payload, dtype=np.uint8, count=num_bytes)
        if numel % 8 and int(packed[-1]) & (0xFF >> (numel % 8)):
            raise check.error("padding bits after the last element are not zero")
        signs = torch.from_numpy(np.unpackbits(packed, count=numel)).view(torch.bool)
        out = torch.empty(numel, dtype=torch.float32)
        row = 0
        for bits, dst in zip(
            block_views(signs, block_size), block_views(out, block_size), strict=True
        ):
            scale = scales[row : row + bits.shape[0]].unsqueeze(1)
            torch.where(bits, scale, scale.neg(), out=dst)
            row += bits.shape[0]
        return out.view(encoded.shape)
