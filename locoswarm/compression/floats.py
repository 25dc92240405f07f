"""Plain floating-point codecs: fp32 (raw bytes), fp16 and bf16 (casts).

Payload: the ``numel`` values in the wire dtype, little-endian, row-major; ``block_size`` and
``k_per_chunk`` are 0. Decoding returns float32 whatever the original dtype was (a float64 or fp16
tensor sent with the fp32 codec comes back as float32). This module knows nothing about the
network, error feedback or the other codecs.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import torch
from torch import Tensor

from locoswarm.compression.encoded import (
    DEFAULT_LIMITS,
    DecodeLimits,
    Encoded,
    HeaderCheck,
    all_finite,
    check_finite,
    describe_tensor,
    dtype_name,
    flatten_input,
    read_tensor,
    tensor_bytes,
)

__all__ = ["Bf16Codec", "Fp16Codec", "Fp32Codec"]

WIRE_DTYPES: Final[dict[str, torch.dtype]] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def _encode_float(codec: str, tensor: Tensor, name: str) -> Encoded:
    flat = flatten_input(tensor, codec=codec, name=name)
    wire_dtype = WIRE_DTYPES[codec]
    if wire_dtype == torch.float32:
        wire = flat
        check_finite(wire, codec=codec, name=name, what="values")
    else:
        wire = flat.to(wire_dtype)
        # One check on the (smaller) cast result catches NaN, Inf and overflow alike.
        if not all_finite(wire):
            check_finite(flat, codec=codec, name=name, what="values")
            largest = torch.finfo(wire_dtype).max
            raise ValueError(
                f"codec {codec}, tensor {describe_tensor(name)}: a value overflows "
                f"{wire_dtype} (largest finite value {largest:g}); use fp32 or a scaled codec"
            )
    return Encoded(
        codec=codec,
        shape=tuple(tensor.shape),
        dtype=dtype_name(tensor),
        payload=tensor_bytes(wire),
        name=name,
    )


def _received_buffer(payload: bytes | bytearray | memoryview) -> bool:
    """Whether ``payload`` is (a view of) a received message's own buffer (a ``bytearray`` or
    an anonymous ``mmap``, which nothing else reads or writes), little-endian and aligned for
    float32."""
    base = payload.obj if isinstance(payload, memoryview) else payload
    if not isinstance(base, bytearray | mmap.mmap) or sys.byteorder != "little" or not len(payload):
        return False
    return int(np.frombuffer(payload, dtype=np.uint8).ctypes.data) % 4 == 0


def _decode_float(codec: str, encoded: Encoded, limits: DecodeLimits) -> Tensor:
    wire_dtype = WIRE_DTYPES[codec]
    check = HeaderCheck(encoded, codec=codec, limits=limits)
    check.require_params(block_size=(0, 0), k_per_chunk=(0, 0))
    itemsize = torch.finfo(wire_dtype).bits // 8
    numel = check.numel
    check.require_length(itemsize * numel, f"{numel} elements of {itemsize} bytes")
    if wire_dtype == torch.float32 and _received_buffer(encoded.payload):
        # A received payload is ours alone: read the values in place instead of copying them.
        values = torch.frombuffer(encoded.payload, dtype=torch.float32, count=numel)
    else:
        values = read_tensor(encoded.payload, offset=0, count=numel, dtype=wire_dtype)
    if wire_dtype != torch.float32:
        values = values.to(torch.float32)
    check.require_finite(values, "values", limits)
    return values.view(encoded.shape)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp32Codec:
    """Raw float32 bytes: lossless for float32 input, 32 bits per element."""

    name: ClassVar[str] = "fp32"

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Encode ``tensor`` as raw float32 (float64 input is rounded to float32)."""
        return _encode_float(self.name, tensor, name)

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode an fp32 payload; see ``Codec.decode``."""
        return _decode_float(self.name, encoded, limits)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp16Codec:
    """IEEE half precision, 16 bits per element; encoding a value above 65504 is an error."""

    name: ClassVar[str] = "fp16"

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Encode ``tensor`` as float16 (round to nearest even)."""
        return _encode_float(self.name, tensor, name)

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode an fp16 payload to float32; see ``Codec.decode``."""
        return _decode_float(self.name, encoded, limits)


@dataclass(frozen=True, kw_only=True, slots=True)
class Bf16Codec:
    """bfloat16, 16 bits per element: float32's range with an 8-bit mantissa."""

    name: ClassVar[str] = "bf16"

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Encode ``tensor`` as bfloat16 (round to nearest even)."""
        return _encode_float(self.name, tensor, name)

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Decode a bf16 payload to float32; see ``Codec.decode``."""
        return _decode_float(self.name, encoded, limits)
