"""The wire value of a compressed tensor, the ``Codec`` interface, and untrusted-header checks.

``Encoded`` is what a codec produces and what crosses the network: a codec name, the original
shape and dtype, a little-endian byte payload and the two integer parameters a decoder needs.
This module also holds the pieces every codec shares: flattening input to fp32, copying between
tensors and bytes, and validating a header from a stranger before anything is allocated. It knows
nothing about any particular codec's layout (each codec module states its own), about sockets,
protobufs or asyncio, or about which training algorithm is sending the tensor.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import torch
from torch import Tensor

from locoswarm.errors import ProtocolViolation

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPE_NAMES",
    "MAX_BLOCK_SIZE",
    "Codec",
    "CorruptPayload",
    "DecodeLimits",
    "Encoded",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    # Payloads are little-endian; tobytes()/frombuffer use native order, so refuse to run rather
    # than silently exchange byte-swapped tensors with the rest of the swarm.
    raise ImportError("locoswarm.compression requires a little-endian host")

DTYPE_NAMES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""Original dtypes a tensor may have had. Decoding always returns float32 regardless."""

MAX_BLOCK_SIZE: Final = 2**31 - 1
"""Largest block size a header may carry for the blockwise codecs."""

_MAX_NAME_CHARS: Final = 200


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """One compressed tensor: header fields plus the payload bytes.

    Produced by ``Codec.encode``; when it arrives from a peer every field is untrusted and
    ``decode`` checks them all before allocating.
    """

    codec: str
    """Codec name: "fp32", "fp16", "bf16", "int8", "int4", "sign" or "topk"."""
    shape: tuple[int, ...]
    """Shape of the original tensor; ``()`` for a scalar."""
    dtype: str
    """Original dtype name, e.g. "float32". Informational: decoding always returns float32."""
    payload: bytes | bytearray | memoryview
    """Everything needed to decode (values, scales, indices), little-endian, no padding. A
    bytes-like object: encoders may fill a buffer allocated once, a received message's parts
    are views into its payload (never copied)."""
    block_size: int = 0
    """Block length of int8/int4/sign, chunk length of topk; 0 for the fp codecs."""
    k_per_chunk: int = 0
    """topk: values kept per full chunk; 0 for every other codec."""
    name: str = ""
    """Tensor name, used only in error messages."""

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        """Payload length in bytes (the header is not counted)."""
        return len(self.payload)

    @property
    def bits_per_element(self) -> float:
        """Payload bits per original element; 0.0 for an empty tensor."""
        numel = self.numel
        return 8.0 * len(self.payload) / numel if numel else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeLimits:
    """What a decoder accepts from a peer."""

    max_numel: int = 2**31 - 1
    """Largest element count a header may announce; checked before any allocation."""
    allow_nonfinite: bool = False
    """Accept NaN or Inf among decoded values and scales (never negative scales)."""


DEFAULT_LIMITS: Final = DecodeLimits()


class Codec(Protocol):
    """Turns a tensor into an ``Encoded`` and back.

    ``encode`` flattens its input to 1-D float32 first and raises ``ValueError`` naming the tensor
    if it holds NaN or Inf (or, for fp16, a value that overflows). ``decode`` always returns a
    float32 CPU tensor of ``encoded.shape`` and raises ``CorruptPayload`` for anything malformed.
    """

    @property
    def name(self) -> str:
        """Codec name written into ``Encoded.codec``."""
        ...

    def encode(self, tensor: Tensor, *, name: str = "") -> Encoded:
        """Compress ``tensor``; ``name`` is carried for error messages only."""
        ...

    def decode(self, encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
        """Reconstruct a float32 tensor from an untrusted ``encoded``."""
        ...


def describe_tensor(name: str) -> str:
    """Quote a (possibly hostile) tensor name for an error message, truncated."""
    if not name:
        return "'<unnamed>'"
    if len(name) > _MAX_NAME_CHARS:
        return repr(name[:_MAX_NAME_CHARS]) + "..."
    return repr(name)


class CorruptPayload(ProtocolViolation):
    """An ``Encoded`` from a peer is malformed: bad header, wrong length or bad values."""

    def __init__(self, codec: str, tensor_name: str, message: str) -> None:
        codec_text = codec if len(codec) <= 32 else repr(codec[:32]) + "..."
        tensor_text = describe_tensor(tensor_name)
        super().__init__(None, f"codec {codec_text}, tensor {tensor_text}: {message}")
        self.codec = codec
        self.tensor_name = tensor_name


def flatten_input(tensor: Tensor, *, codec: str, name: str) -> Tensor:
    """Return ``tensor`` as a contiguous 1-D float32 tensor on its own device.

    Raises:
        ValueError: ``tensor`` is not a floating-point tensor of a known dtype.
    """
    if tensor.dtype not in DTYPE_NAMES.values():
        raise ValueError(
            f"codec {codec}, tensor {describe_tensor(name)}: cannot encode dtype {tensor.dtype}"
        )
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat.contiguous()


def dtype_name(tensor: Tensor) -> str:
    """Name of ``tensor``'s dtype as carried in ``Encoded.dtype`` (e.g. "float32")."""
    return str(tensor.dtype).removeprefix("torch.")


def all_finite(values: Tensor) -> bool:
    """True when ``values`` holds no NaN or Inf.

    A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the tensor finite with
    one fast reduction; ``isfinite().all()`` is several times slower on CPU and only runs when the
    sum overflowed or the tensor really is non-finite.
    """
    if not values.numel() or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def check_finite(values: Tensor, *, codec: str, name: str, what: str) -> None:
    """Raise ``ValueError`` if the encoder's ``values`` hold NaN or Inf (our input, our fault)."""
    if not all_finite(values):
        raise ValueError(
            f"codec {codec}, tensor {describe_tensor(name)}: {what} contain NaN or Inf; "
            "non-finite tensors are not encoded"
        )


def tensor_bytes(*parts: Tensor) -> bytes:
    """Concatenate the raw little-endian bytes of ``parts`` (moved to CPU, made contiguous)."""
    arrays = [p.detach().cpu().contiguous().view(torch.uint8).numpy() for p in parts if p.numel()]
    if not arrays:
        return b""
    if len(arrays) == 1:
        return arrays[0].tobytes()
    return b"".join(a.data for a in arrays)


def read_tensor(
    payload: bytes | bytearray | memoryview, *, offset: int, count: int, dtype: torch.dtype
) -> Tensor:
    """Copy ``count`` elements of ``dtype`` starting at byte ``offset`` into a new CPU tensor.

    The copy makes the result writable and aligned; the caller has already checked the length.
    """
    out = torch.empty(count, dtype=dtype)
    if count:
        raw = out.view(torch.uint8).numpy()
        raw[:] = np.frombuffer(payload, dtype=np.uint8, count=raw.size, offset=offset)
    return out


class HeaderCheck:
    """Validates the generic part of an untrusted header and builds ``CorruptPayload`` errors."""

    __slots__ = ("codec", "encoded", "numel")

    def __init__(self, encoded: Encoded, *, codec: str, limits: DecodeLimits) -> None:
        """Check codec name, dtype name and shape; ``numel`` is set when this returns.

        Raises:
            CorruptPayload: the codec does not match, or the dtype or shape is invalid.
        """
        self.encoded = encoded
        self.codec = codec
        if encoded.codec != codec:
            raise self.error(f"decoder for {codec} got a payload labelled {encoded.codec!r:.40}")
        if encoded.dtype not in DTYPE_NAMES:
            raise self.error(f"unknown dtype {encoded.dtype!r:.40}")
        shape = encoded.shape
        if not isinstance(shape, tuple) or len(shape) > 64:
            raise self.error("shape must be a tuple of at most 64 dimensions")
        numel = 1
        for dim in shape:
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise self.error(f"invalid dimension {dim!r:.40} in shape")
            numel *= dim
            if numel > limits.max_numel:
                break  # stop multiplying huge numbers; reported below
        if numel > limits.max_numel:
            raise self.error(f"shape announces more than {limits.max_numel} elements")
        self.numel = numel

    def error(self, message: str) -> CorruptPayload:
        """A ``CorruptPayload`` naming this codec and the tensor."""
        return CorruptPayload(self.codec, self.encoded.name, message)

    def require_params(self, *, block_size: tuple[int, int], k_per_chunk: tuple[int, int]) -> None:
        """Check ``block_size`` and ``k_per_chunk`` against inclusive ``(low, high)`` ranges."""
        for field, (low, high) in (("block_size", block_size), ("k_per_chunk", k_per_chunk)):
            value = getattr(self.encoded, field)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise self.error(f"{field} {value!r:.40} is outside [{low}, {high}]")

    def require_length(self, expected: int, layout: str) -> None:
        """Check the payload is exactly ``expected`` bytes; ``layout`` explains the number."""
        actual = len(self.encoded.payload)
        if actual != expected:
            raise self.error(f"payload is {actual} bytes, expected {expected} for {layout}")

    def require_finite(self, values: Tensor, what: str, limits: DecodeLimits) -> None:
        """Reject NaN/Inf in decoded ``values`` unless ``limits.allow_nonfinite``."""
        if not limits.allow_nonfinite and not all_finite(values):
            raise self.error(f"{what} contain NaN or Inf")

    def require_scales(self, scales: Tensor, limits: DecodeLimits) -> None:
        """Reject negative scales always, and NaN or Inf scales unless allowed."""
        self.require_finite(scales, "scales", limits)
        if bool((scales < 0).any()):
            raise self.error("scales contain a negative value")
