"""Codec round trips, exact vectors from compression.md §6, sizes and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locoswarm.compression import (
    CODEC_NAMES,
    Encoded,
    Int4Codec,
    Int8Codec,
    SignCodec,
    TopKCodec,
    decode,
    get_codec,
    roundtrip,
)
from locoswarm.errors import ConfigError


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- compression.md §6 vectors -------------------------------------------------------------


def test_t1_top1_keeps_largest_magnitude_and_costs_one_value_and_one_index() -> None:
    codec = TopKCodec(ratio=0.01)  # chunk 65536, k=656; a 4-element tail keeps ceil(656*4/65536)=1
    encoded, out = roundtrip(codec, torch.tensor([0.5, -2.0, 1.0, 0.25]))
    assert out.tolist() == [0.0, -2.0, 0.0, 0.0]
    # fp32 value + uint16 index: 6 bytes (the spec's fp32 + int32 format would be 8).
    assert encoded.num_bytes == 6
    assert encoded.payload == np.array([-2.0], "<f4").tobytes() + np.array([1], "<u2").tobytes()


def test_t1_steps_two_and_three_with_error_feedback() -> None:
    codec = TopKCodec(ratio=0.25, chunk_size=4)  # exactly top-1 of 4
    e = torch.zeros(4)
    sent = []
    for g in ([0.5, -2, 1, 0.25], [0.5, 0.5, 0.5, 0.125], [0, 0, 0, 0]):
        p = torch.tensor(g) + e
        _, c = roundtrip(codec, p)
        e = p - c
        sent.append(c.tolist())
    assert sent == [[0, -2, 0, 0], [0, 0, 1.5, 0], [1, 0, 0, 0]]
    assert e.tolist() == [0, 0.5, 0, 0.375]


def test_topk_ties_go_to_the_lowest_index() -> None:
    codec = TopKCodec(ratio=0.25, chunk_size=8)  # k = 2 per chunk
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, -3.0, 0.0, 0.0])
    _, out = roundtrip(codec, x)
    assert out.tolist() == [0, -3, 3, 0, 0, 0, 0, 0]
    # All-equal magnitudes, including zeros: still the lowest indices, every time.
    _, zeros = roundtrip(TopKCodec(ratio=0.5, chunk_size=4), torch.tensor([0.0, -0.0, 0.0, 0.0]))
    enc = TopKCodec(ratio=0.05, chunk_size=80).encode(torch.ones(80))
    assert enc.k_per_chunk == 4
    assert np.frombuffer(enc.payload[16:], "<u2").tolist() == [0, 1, 2, 3]
    assert zeros.abs().sum() == 0


def test_t1_top1_bitmap_layout_when_denser_than_one_in_sixteen() -> None:
    codec = TopKCodec(ratio=0.25, chunk_size=4)
    encoded = codec.encode(torch.tensor([0.5, -2.0, 1.0, 0.25]))
    assert encoded.k_per_chunk == 1
    assert encoded.num_bytes == 5  # one fp32 value + one bitmap byte
    assert encoded.payload[4:] == bytes([0b0100_0000])


def test_t2_scaled_sign_two_steps() -> None:
    codec = SignCodec()
    p1 = torch.tensor([1.0, -2.0, 3.0, -4.0])
    enc1, c1 = roundtrip(codec, p1)
    assert c1.tolist() == [2.5, -2.5, 2.5, -2.5]
    assert enc1.payload == bytes([0xA0]) + np.array([2.5], "<f4").tobytes()
    e1 = p1 - c1
    assert float(e1.square().sum()) == 5.0
    p2 = torch.ones(4) + e1
    assert p2.tolist() == [-0.5, 1.5, 1.5, -0.5]
    enc2, c2 = roundtrip(codec, p2)
    assert enc2.payload == bytes([0x60]) + np.array([1.0], "<f4").tobytes()
    assert c2.tolist() == [-1, 1, 1, -1]
    assert (c1 + c2 + (p2 - c2)).tolist() == [2, -1, 4, -3]


def test_sign_of_zero_is_plus() -> None:
    _, out = roundtrip(SignCodec(), torch.tensor([0.0, -1.0]))
    assert out.tolist() == [0.5, -0.5]


def test_t3_int8_absmax() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0])
    encoded, out = roundtrip(Int8Codec(), x)
    codes = np.frombuffer(encoded.payload[:5], np.int8).tolist()
    assert codes == [-127, -64, 0, 38, 127]
    scale = float(np.frombuffer(encoded.payload[5:], "<f4")[0])
    assert scale == pytest.approx(1 / 127)
    assert float((x - out).abs().max()) <= scale / 2 * (1 + 1e-6)


def test_t9_sign_ten_elements_is_six_bytes() -> None:
    assert SignCodec().encode(_randn(10)).num_bytes == 6


@pytest.mark.parametrize(
    ("name", "max_bits"),
    [
        ("fp32", 32.0),
        ("fp16", 16.0),
        ("bf16", 16.0),
        ("int8", 8.01),
        ("int4", 4.02),
        ("sign", 1.01),
        ("topk", 0.5),
    ],
)
def test_bits_per_element_on_a_million_elements(name: str, max_bits: float) -> None:
    encoded = get_codec(name).encode(_randn(1 << 20))
    assert encoded.bits_per_element <= max_bits
    assert encoded.numel == 1 << 20


def test_exact_payload_sizes() -> None:
    x = _randn(10_001)
    assert get_codec("int8", block_size=1000).encode(x).num_bytes == 10_001 + 4 * 11
    assert get_codec("int4", block_size=1000).encode(x).num_bytes == 5_001 + 4 * 11
    assert get_codec("sign", block_size=1000).encode(x).num_bytes == 1_251 + 4 * 11
    assert get_codec("fp16").encode(x).num_bytes == 20_002


# --- round-trip tolerances -----------------------------------------------------------------


def test_fp32_is_exact_and_fp_casts_are_close() -> None:
    x = _randn(3, 1001)
    assert torch.equal(roundtrip(get_codec("fp32"), x)[1], x)
    assert torch.allclose(roundtrip(get_codec("fp16"), x)[1], x, rtol=1e-3, atol=1e-6)
    assert torch.allclose(roundtrip(get_codec("bf16"), x)[1], x, rtol=8e-3, atol=1e-30)


def test_decode_returns_float32_for_any_original_dtype() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = _randn(17).to(dtype)
        encoded, out = roundtrip(get_codec("fp32"), x)
        assert encoded.dtype == str(dtype).removeprefix("torch.")
        assert out.dtype == torch.float32
        assert torch.equal(out, x.float())


@pytest.mark.parametrize(
    ("qmax", "codec"), [(127, Int8Codec(block_size=64)), (7, Int4Codec(block_size=64))]
)
def test_int_quantizers_error_is_at_most_half_a_step(
    qmax: int, codec: Int8Codec | Int4Codec
) -> None:
    x = _randn(64 * 50 + 13) * torch.linspace(0.01, 100, 64 * 50 + 13)
    _, out = roundtrip(codec, x)
    padded = torch.cat([x, x.new_zeros(-x.numel() % 64)]).view(-1, 64)
    step = padded.abs().amax(dim=1, keepdim=True) / qmax
    err = torch.cat([(x - out), x.new_zeros(-x.numel() % 64)]).view(-1, 64).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-30).all())


def test_all_zero_blocks_have_zero_scale() -> None:
    x = torch.zeros(100)
    x[50:] = 1.0
    for codec in (Int8Codec(block_size=50), Int4Codec(block_size=50), SignCodec(block_size=50)):
        encoded, out = roundtrip(codec, x)
        assert torch.equal(out, x)
        assert np.frombuffer(encoded.payload[-8:], "<f4")[0] == 0


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_topk_is_contractive(ratio: float) -> None:
    x = _randn(70_000)
    codec = TopKCodec(ratio=ratio)
    _, out = roundtrip(codec, x)
    d = x.numel()
    kept = int((out != 0).sum())
    assert kept >= ratio * d
    assert float((out - x).square().sum()) <= (1 - kept / d) * float(x.square().sum()) + 1e-3
    assert torch.equal(out[out != 0], x[out != 0])


def test_sign_is_contractive_with_the_l1_scale() -> None:
    x = _randn(4096 * 3)
    _, out = roundtrip(SignCodec(), x)
    err = float((out - x).square().sum())
    expected = sum(
        float(b.square().sum()) - float(b.abs().sum()) ** 2 / b.numel() for b in x.view(3, -1)
    )
    assert err == pytest.approx(expected, rel=1e-4)
    assert err < float(x.square().sum())


# --- determinism and shapes ----------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_and_decode_are_deterministic(name: str) -> None:
    x = _randn(200_003)
    codec = get_codec(name, block_size=1000, topk_ratio=0.05)
    first, second = codec.encode(x), codec.encode(x.clone())
    assert first == second
    assert torch.equal(decode(first), decode(first))


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (5, 3), (2, 3, 129)])
def test_shapes_round_trip(name: str, shape: tuple[int, ...]) -> None:
    x = _randn(*shape) if shape else torch.tensor(1.25)
    encoded, out = roundtrip(get_codec(name, block_size=8, topk_ratio=1.0), x)
    assert encoded.shape == shape
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    if name in ("fp32", "topk"):
        assert torch.equal(out, x)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_non_contiguous_input_matches_contiguous(name: str) -> None:
    x = _randn(64, 33).t()
    assert not x.is_contiguous()
    codec = get_codec(name, block_size=100, topk_ratio=0.1)
    assert codec.encode(x) == codec.encode(x.contiguous())


def test_name_is_carried() -> None:
    assert get_codec("int8").encode(torch.ones(3), name="layer.0.w").name == "layer.0.w"


# --- encoder and config errors -------------------------------------------------------------


def test_fp16_overflow_names_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"fp16.*'big'.*overflows"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e5]), name="big")


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encoders_refuse_non_finite_input(name: str, bad: float) -> None:
    x = torch.ones(100)
    x[37] = bad
    with pytest.raises(ValueError, match=r"'w'.*NaN or Inf"):
        get_codec(name, block_size=16).encode(x, name="w")


def test_encoders_refuse_integer_tensors() -> None:
    with pytest.raises(ValueError, match="dtype"):
        get_codec("int8").encode(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("zip", {}),
        ("int8", {"block_size": 0}),
        ("int4", {"block_size": -1}),
        ("sign", {"block_size": 2**31}),
        ("topk", {"topk_ratio": 0.0}),
        ("topk", {"topk_ratio": 1.5}),
        ("topk", {"topk_ratio": math.nan}),
    ],
)
def test_get_codec_rejects_bad_config(name: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        get_codec(name, **kwargs)  # type: ignore[arg-type]


def test_encoded_properties() -> None:
    encoded = Encoded(codec="fp32", shape=(2, 3), dtype="float32", payload=bytes(24))
    assert (encoded.numel, encoded.num_bytes, encoded.bits_per_element) == (6, 24, 32.0)
    empty = Encoded(codec="fp32", shape=(0,), dtype="float32", payload=b"")
    assert empty.bits_per_element == 0.0


def test_topk_k_per_chunk_is_not_inflated_by_float_rounding() -> None:
    assert TopKCodec(ratio=0.07, chunk_size=100).k_per_chunk == 7
    assert TopKCodec(ratio=0.01).k_per_chunk == 656
    assert TopKCodec(ratio=1e-9).k_per_chunk == 1
