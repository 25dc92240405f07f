"""One test per reason an untrusted ``Encoded`` is rejected; each message names codec and tensor."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from locoswarm.compression import (
    CODEC_NAMES,
    CorruptPayload,
    DecodeLimits,
    Encoded,
    Int8Codec,
    TopKCodec,
    decode,
    get_codec,
)
from locoswarm.errors import ProtocolViolation

NAME = "layer.0.w"


def _encoded(codec: str, numel: int = 1000, **kwargs: float) -> Encoded:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    return get_codec(codec, block_size=64, **kwargs).encode(x, name=NAME)


def _rejects(encoded: Encoded, match: str, *, limits: DecodeLimits | None = None) -> str:
    with pytest.raises(CorruptPayload, match=match) as info:
        decode(encoded) if limits is None else decode(encoded, limits=limits)
    message = str(info.value)
    assert isinstance(info.value, ProtocolViolation)
    assert f"codec {encoded.codec}" in message or "codec '" in message
    assert f"tensor '{encoded.name}'" in message if encoded.name else "<unnamed>" in message
    return message


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_short_payload(codec: str) -> None:
    enc = _encoded(codec)
    message = _rejects(dataclasses.replace(enc, payload=enc.payload[:-1]), "payload is")
    assert f"expected {enc.num_bytes}" in message


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_long_payload(codec: str) -> None:
    enc = _encoded(codec)
    _rejects(dataclasses.replace(enc, payload=bytes(enc.payload) + b"\0"), "payload is")


def test_length_message_explains_the_layout() -> None:
    enc = Encoded(codec="int8", shape=(4096,), dtype="float32", payload=bytes(100), block_size=4096)
    with pytest.raises(CorruptPayload) as info:
        decode(dataclasses.replace(enc, name=NAME))
    assert str(info.value).endswith(
        "codec int8, tensor 'layer.0.w': payload is 100 bytes, expected 4100 for 4096 elements "
        "in blocks of 4096 (int8 codes + fp32 scales)"
    )


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_shape_with_a_different_numel(codec: str) -> None:
    _rejects(dataclasses.replace(_encoded(codec), shape=(10, 99)), "payload is")


def test_unnamed_tensor_is_reported_as_unnamed() -> None:
    enc = dataclasses.replace(_encoded("fp32"), shape=(999,), name="")
    _rejects(enc, "<unnamed>")


@pytest.mark.parametrize("shape", [(-1,), (10, -100)])
def test_negative_dimension(shape: tuple[int, ...]) -> None:
    _rejects(dataclasses.replace(_encoded("int8"), shape=shape), "invalid dimension")


def test_non_integer_dimension() -> None:
    _rejects(dataclasses.replace(_encoded("fp16"), shape=(2.5,)), "invalid dimension")  # type: ignore[arg-type]


def test_numel_over_the_limit_is_rejected_before_allocating() -> None:
    enc = dataclasses.replace(_encoded("fp32"), shape=(2**40, 2**40))
    _rejects(enc, "more than 2147483647 elements")
    _rejects(_encoded("fp32"), "more than 999 elements", limits=DecodeLimits(max_numel=999))


def test_unknown_codec() -> None:
    enc = dataclasses.replace(_encoded("int8"), codec="zstd")
    message = _rejects(enc, "unknown codec")
    assert message.startswith("peer ?: codec zstd, tensor 'layer.0.w'")


def test_codec_instance_rejects_another_codecs_payload() -> None:
    with pytest.raises(CorruptPayload, match=r"codec int8, tensor 'layer.0.w'.*labelled 'fp32'"):
        Int8Codec().decode(_encoded("fp32"))


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_unknown_dtype(codec: str) -> None:
    _rejects(dataclasses.replace(_encoded(codec), dtype="int64"), "unknown dtype 'int64'")


def _set_float(payload: bytes, offset: int, value: float) -> bytes:
    return payload[:offset] + np.array([value], "<f4").tobytes() + payload[offset + 4 :]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", ["fp32", "topk"])
def test_nonfinite_value(codec: str, bad: float) -> None:
    enc = _encoded(codec, topk_ratio=0.1)
    enc = dataclasses.replace(enc, payload=_set_float(bytes(enc.payload), 8, bad))
    _rejects(enc, "values contain NaN or Inf")
    assert decode(enc, limits=DecodeLimits(allow_nonfinite=True)).numel() == 1000


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_nonfinite_half_value(codec: str, bad: float) -> None:
    enc = _encoded(codec)
    half = torch.tensor([bad], dtype=torch.float16 if codec == "fp16" else torch.bfloat16)
    raw = half.view(torch.uint8).numpy().tobytes()
    enc = dataclasses.replace(enc, payload=raw + enc.payload[2:])
    _rejects(enc, "values contain NaN or Inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("codec", "scales_at"), [("int8", 1000), ("int4", 500), ("sign", 125)])
def test_nonfinite_scale(codec: str, scales_at: int, bad: float) -> None:
    enc = _encoded(codec)
    enc = dataclasses.replace(enc, payload=_set_float(bytes(enc.payload), scales_at + 4, bad))
    _rejects(enc, "scales contain NaN or Inf")
    decode(enc, limits=DecodeLimits(allow_nonfinite=True))


@pytest.mark.parametrize(("codec", "scales_at"), [("int8", 1000), ("int4", 500), ("sign", 125)])
def test_negative_scale(codec: str, scales_at: int) -> None:
    enc = _encoded(codec)
    enc = dataclasses.replace(enc, payload=_set_float(bytes(enc.payload), scales_at, -1.0))
    _rejects(enc, "negative", limits=DecodeLimits(allow_nonfinite=True))


@pytest.mark.parametrize(
    ("codec", "field", "value"),
    [
        ("int8", "block_size", 0),
        ("int4", "block_size", -64),
        ("sign", "block_size", 2**31),
        ("int8", "k_per_chunk", 3),
        ("fp32", "block_size", 64),
        ("fp16", "k_per_chunk", 1),
        ("topk", "block_size", 65537),
        ("topk", "k_per_chunk", 0),
    ],
)
def test_bad_block_size_or_k(codec: str, field: str, value: int) -> None:
    enc = _encoded(codec)
    if field == "block_size":
        enc = dataclasses.replace(enc, block_size=value)
    else:
        enc = dataclasses.replace(enc, k_per_chunk=value)
    _rejects(enc, rf"{field} {value} is outside")


def test_topk_k_larger_than_chunk() -> None:
    enc = dataclasses.replace(_encoded("topk"), block_size=100, k_per_chunk=101)
    _rejects(enc, "exceeds the chunk length")


def _topk_with_indices(indices: list[int]) -> Encoded:
    # chunk 100, k 4: uint16 indices (16 * 4 <= 100); a 10-element tensor keeps ceil(4*10/100) = 1.
    enc = TopKCodec(ratio=0.04, chunk_size=100).encode(torch.arange(200.0), name=NAME)
    assert enc.k_per_chunk == 4
    assert np.frombuffer(enc.payload[32:], "<u2").tolist() == [96, 97, 98, 99] * 2
    return dataclasses.replace(
        enc, payload=bytes(enc.payload)[:32] + np.array(indices, "<u2").tobytes()
    )


def test_topk_index_out_of_range() -> None:
    _rejects(_topk_with_indices([96, 97, 98, 100, 0, 1, 2, 3]), "not below the chunk length 100")


@pytest.mark.parametrize("indices", [[96, 97, 99, 98, 0, 1, 2, 3], [1, 1, 2, 3, 0, 1, 2, 3]])
def test_topk_indices_not_strictly_increasing(indices: list[int]) -> None:
    _rejects(_topk_with_indices(indices), "not strictly increasing")


def test_topk_index_out_of_range_in_the_tail_chunk() -> None:
    enc = TopKCodec(ratio=0.04, chunk_size=100).encode(torch.arange(110.0), name=NAME)
    payload = bytes(enc.payload)[:-2] + np.array([10], "<u2").tobytes()
    _rejects(dataclasses.replace(enc, payload=payload), "not below the chunk length 10")


def test_topk_bitmap_with_wrong_popcount() -> None:
    enc = TopKCodec(ratio=0.25, chunk_size=8).encode(torch.arange(16.0), name=NAME)
    assert enc.payload[-2:] == bytes([0b0000_0011, 0b0000_0011])
    bad = bytes(enc.payload)[:-2] + bytes([0b0000_0111, 0b0000_0001])
    _rejects(dataclasses.replace(enc, payload=bad), "exactly 2 bits set")


def test_topk_bitmap_padding_bits() -> None:
    enc = TopKCodec(ratio=0.25, chunk_size=8).encode(torch.arange(12.0), name=NAME)
    bad = bytes(enc.payload)[:-1] + bytes([enc.payload[-1] | 1])
    _rejects(dataclasses.replace(enc, payload=bad), "padding bits")


def test_int4_nibble_zero_is_invalid() -> None:
    enc = _encoded("int4")
    for bad_byte in (enc.payload[0] & 0xF0, enc.payload[0] & 0x0F):
        payload = bytes([bad_byte]) + enc.payload[1:]
        _rejects(dataclasses.replace(enc, payload=payload), re.escape("nibble 0 (q = -8)"))


def test_int4_padding_nibble_must_be_zero() -> None:
    enc = _encoded("int4", numel=999)
    last = 499
    payload = (
        bytes(enc.payload)[:last] + bytes([enc.payload[last] | 0x80]) + enc.payload[last + 1 :]
    )
    _rejects(dataclasses.replace(enc, payload=payload), "padding nibble")


def test_sign_padding_bits_must_be_zero() -> None:
    enc = _encoded("sign", numel=999)
    last = 124
    payload = bytes(enc.payload)[:last] + bytes([enc.payload[last] | 1]) + enc.payload[last + 1 :]
    _rejects(dataclasses.replace(enc, payload=payload), "padding bits")


def test_hostile_long_name_is_truncated() -> None:
    enc = dataclasses.replace(_encoded("fp32"), name="x" * 10_000, shape=(1,))
    with pytest.raises(CorruptPayload) as info:
        decode(enc)
    assert len(str(info.value)) < 400
