"""Codec registry: look a codec up by name, and decode any ``Encoded`` by its own header.

``get_codec`` builds a configured codec for the sender. ``decode`` is for the receiver: it picks
the decoder from ``encoded.codec`` and reads every parameter from the header, never from local
configuration, so a peer configured differently still decodes what it receives. This module knows
nothing about the network, error feedback, or which tensors get which codec.
"""

from __future__ import annotations

from typing import Final

from torch import Tensor

from locoswarm.compression.encoded import (
    DEFAULT_LIMITS,
    Codec,
    CorruptPayload,
    DecodeLimits,
    Encoded,
)
from locoswarm.compression.floats import Bf16Codec, Fp16Codec, Fp32Codec
from locoswarm.compression.quant import Int4Codec, Int8Codec
from locoswarm.compression.sign import SignCodec
from locoswarm.compression.sparse import TopKCodec
from locoswarm.errors import ConfigError

__all__ = ["CODEC_NAMES", "decode", "get_codec", "roundtrip"]

CODEC_NAMES: Final[tuple[str, ...]] = ("fp32", "fp16", "bf16", "int8", "int4", "sign", "topk")

# Decoding reads all parameters from the header, so one default instance per codec serves all.
_DECODERS: Final[dict[str, Codec]] = {
    codec.name: codec
    for codec in (
        Fp32Codec(),
        Fp16Codec(),
        Bf16Codec(),
        Int8Codec(),
        Int4Codec(),
        SignCodec(),
        TopKCodec(),
    )
}


def get_codec(name: str, *, block_size: int = 4096, topk_ratio: float = 0.01) -> Codec:
    """Build the codec called ``name``.

    Args:
        name: One of ``CODEC_NAMES``.
        block_size: Elements per float32 scale for int8, int4 and sign; ignored by the others.
        topk_ratio: Fraction kept by topk, in (0, 1]; topk always uses chunks of 65536.

    Returns:
        A codec whose ``encode`` output any peer's ``decode`` accepts.

    Raises:
        ConfigError: unknown name, or a parameter out of range.
    """
    match name:
        case "fp32":
            return Fp32Codec()
        case "fp16":
            return Fp16Codec()
        case "bf16":
            return Bf16Codec()
        case "int8":
            return Int8Codec(block_size=block_size)
        case "int4":
            return Int4Codec(block_size=block_size)
        case "sign":
            return SignCodec(block_size=block_size)
        case "topk":
            return TopKCodec(ratio=topk_ratio)
        case _:
            raise ConfigError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_NAMES)}")


def decode(encoded: Encoded, *, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensor:
    """Decode an untrusted ``encoded`` with the codec its header names.

    Args:
        encoded: Header and payload, typically straight from a peer.
        limits: Size and value limits to enforce before and after reading the payload.

    Returns:
        A new float32 CPU tensor of ``encoded.shape``.

    Raises:
        CorruptPayload: unknown codec, or anything else ``Codec.decode`` rejects.
    """
    decoder = _DECODERS.get(encoded.codec)
    if decoder is None:
        raise CorruptPayload(
            encoded.codec, encoded.name, f"unknown codec; expected one of {', '.join(CODEC_NAMES)}"
        )
    return decoder.decode(encoded, limits=limits)


def roundtrip(codec: Codec, tensor: Tensor) -> tuple[Encoded, Tensor]:
    """Encode ``tensor`` with ``codec`` and decode it again: ``(encoded, reconstruction)``.

    The reconstruction is float32 on the CPU, shaped like ``tensor``; error feedback uses it to
    compute what the receiver will see.
    """
    encoded = codec.encode(tensor)
    return encoded, decode(encoded)
