"""compression: pure-torch codecs (tensor <-> bytes + a small header) with untrusted decoding."""

from locoswarm.compression.codecs import CODEC_NAMES, decode, get_codec, roundtrip
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

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_LIMITS",
    "Bf16Codec",
    "Codec",
    "CorruptPayload",
    "DecodeLimits",
    "Encoded",
    "Fp16Codec",
    "Fp32Codec",
    "Int4Codec",
    "Int8Codec",
    "SignCodec",
    "TopKCodec",
    "decode",
    "get_codec",
    "roundtrip",
]
