"""Quantization with side information (Moniqua; ``consensus.md`` §3.2): send a vector at ``b`` bits
per element when the receiver holds a vector close to it.

The sender rounds ``v`` to the nearest point of a per-block lattice of step ``s`` and sends only
each lattice index modulo ``2^b``, plus the block's step and a checksum of the block's full
indices. The receiver, holding ``w`` close to ``v``, takes in every element the lattice point with
that residue nearest to ``w``. That is the sender's own point exactly whenever
``|v - w| < (2^(b-1) - 1/2) * s``; the sender sizes ``s`` from a bound on that distance
(``siq_steps``). Both sides then know the same ``v_hat`` bit for bit, which is what lets a pair
average into identical weights. Where the bound was too small the receiver's indices differ and
the block's checksum says so: ``siq_decode`` reports those blocks instead of returning values off
by a multiple of ``2^b`` steps. (Rounding is deterministic; the error feedback of the caller, not
randomness, removes its bias.)

Payload (``nb = ceil(n / block_size)``): ``nb`` bfloat16 steps (little-endian), ``nb`` one-byte
checksums (the sum of the block's indices mod 251), then the ``n`` residues packed ``8 / b`` to a
byte for ``b`` in 1, 2, 4 (element ``i`` in the bits ``b * (i mod (8 / b))`` upward), one byte each
for 8, two bytes each (little-endian) for 16.
``Encoded.codec`` is ``"siq"``, ``block_size`` the block length and ``k_per_chunk`` the bit width.

Knows nothing about what the vectors mean, who the partner is or the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeAlias, overload

import numpy as np
import torch
from torch import Tensor

from locoswarm.compression.encoded import DEFAULT_LIMITS, CorruptPayload, DecodeLimits, Encoded

__all__ = [
    "SIQ_BITS",
    "SiqChunk",
    "Sum",
    "Vector",
    "siq_bytes",
    "siq_decode",
    "siq_decode_chunks",
    "siq_encode",
    "siq_hat",
    "siq_hat_chunks",
    "siq_steps",
]

SIQ_BITS = (1, 2, 4, 8, 16)
_NAME = "siq"


@dataclass(frozen=True, slots=True)
class Sum:
    """The 1-D fp32 vector ``a + b``, never held whole: every slice read is summed from the two
    (``torch.add`` of the slices: the same bits as the whole sum's slice)."""

    a: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        for t in (self.a, self.b):
            if t.dim() != 1 or t.dtype != torch.float32 or t.shape != self.a.shape:
                raise ValueError(
                    f"Sum: two 1-D float32 vectors of one length, got {self.a.shape} {self.a.dtype}"
                    f" and {self.b.shape} {self.b.dtype}"
                )

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def numel(self) -> int:
        return self.a.numel()

    def __getitem__(self, where: slice) -> Tensor:
        return torch.add(self.a[where], self.b[where])


Vector: TypeAlias = Tensor | Sum
"""A vector the codec reads a slice at a time: a tensor, or a ``Sum`` it never holds whole."""


def _blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


_CHECK = 251


def siq_bytes(numel: int, bits: int, block_size: int) -> int:
    """Payload size of one ``siq`` message."""
    return 3 * _blocks(numel, block_size) + (numel * bits + 7) // 8


def siq_steps(bound: Tensor, bits: int, margin: float) -> Tensor:
    """Per-block lattice steps that decode exactly within ``margin * bound`` of the sender:
    ``margin * bound / (2^(b-1) - 1/2)``, rounded to bfloat16 (what the payload carries) and
    never zero."""
    step = (bound.double() * margin / (2 ** (bits - 1) - 0.5)).to(torch.bfloat16)
    tiny = torch.tensor(torch.finfo(torch.bfloat16).tiny, dtype=torch.bfloat16)
    return torch.where(step > 0, step, tiny)


def _expand(steps: Tensor, n: int, block_size: int) -> Tensor:
    return steps.double().repeat_interleave(block_size)[:n]


CHUNK_ELEMENTS = 1 << 16
"""Encoding and decoding work through this many elements at a time (whole blocks, a multiple
of 8), so their float64 temporaries are a fixed size (half a MiB each) instead of several model
copies. Every operation is per element or per block: the result is the same bits at any chunk
size."""


def _chunks(n: int, block_size: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(first element, end, first block, end block) of each chunk."""
    unit = math.lcm(block_size, 8)
    size = unit * max(1, chunk // unit)
    return [
        (i0, min(n, i0 + size), i0 // block_size, _blocks(min(n, i0 + size), block_size))
        for i0 in range(0, n, size)
    ]


@overload
def siq_encode(
    v: Vector,
    steps: Tensor,
    *,
    bits: int,
    block_size: int,
    name: str = "",
    chunk: int = CHUNK_ELEMENTS,
    keep_hat: Literal[True] = True,
) -> tuple[Encoded, Tensor]: ...


@overload
def siq_encode(
    v: Vector,
    steps: Tensor,
    *,
    bits: int,
    block_size: int,
    name: str = "",
    chunk: int = CHUNK_ELEMENTS,
    keep_hat: bool,
) -> tuple[Encoded, Tensor | None]: ...


def siq_encode(
    v: Vector,
    steps: Tensor,
    *,
    bits: int,
    block_size: int,
    name: str = "",
    chunk: int = CHUNK_ELEMENTS,
    keep_hat: bool = True,
) -> tuple[Encoded, Tensor | None]:
    """``v`` (1-D fp32) on the lattice of ``steps`` (bfloat16, one per block).

    Returns the message and ``v_hat``, the lattice point a receiver reconstructs (fp32), or None
    with ``keep_hat`` False (``siq_decode`` of the message against ``v`` itself gives it back,
    the same bits). Works ``chunk`` elements at a time into a payload allocated once.
    """
    if bits not in SIQ_BITS:
        raise ValueError(f"siq bits must be one of {SIQ_BITS}, got {bits}")
    n = v.numel()
    nb = _blocks(n, block_size)
    payload = bytearray(siq_bytes(n, bits, block_size))
    payload[: 2 * nb] = steps.contiguous().view(torch.int16).numpy().tobytes()
    v_hat = torch.empty(n, dtype=torch.float32) if keep_hat else None
    residues = 3 * nb
    for i0, i1, b0, b1 in _chunks(n, block_size, chunk):
        part = v[i0:i1]
        if not bool(torch.isfinite(part).all()):
            raise ValueError(f"siq: tensor {name or '<unnamed>'} holds NaN or Inf")
        s = _expand(steps[b0:b1], i1 - i0, block_size)
        # floor(v / s + 0.5), each operation in place on one float64 temporary
        index = part.double().div_(s).add_(0.5).floor_()
        if v_hat is not None:
            v_hat[i0:i1] = s.mul_(index)  # index * s, rounded to float32 as it is stored
        del s
        payload[2 * nb + b0 : 2 * nb + b1] = _checksums(index, block_size).numpy().tobytes()
        packed = _pack(torch.remainder(index, 2**bits).to(torch.int64), bits)
        at = residues + i0 * bits // 8  # i0 is a multiple of 8
        payload[at : at + len(packed)] = packed
    encoded = Encoded(
        codec=_NAME,
        shape=(n,),
        dtype="float32",
        payload=payload,
        block_size=block_size,
        k_per_chunk=bits,
        name=name,
    )
    return encoded, v_hat


def siq_hat(v: Tensor, steps: Tensor, block_size: int, out: Tensor | None = None) -> Tensor:
    """The lattice point a receiver reconstructs of ``v`` (fp32, whole blocks from a block's
    start, possibly a last partial one) on the lattice of its blocks' ``steps``, by
    ``siq_encode``'s own operations: the same bits as that slice of its ``v_hat``; written into
    ``out`` (fp32, ``v``'s size) when given. Trusted input (ours)."""
    s = _expand(steps, v.numel(), block_size)
    index = v.double().div_(s).add_(0.5).floor_()
    hat = s.mul_(index)  # index * s, rounded to float32 as siq_encode stores it
    return hat.float() if out is None else out.copy_(hat)


def siq_hat_chunks(
    encoded: Encoded, v: Vector, *, chunk: int = CHUNK_ELEMENTS
) -> Iterator[tuple[int, int, Tensor]]:
    """``v_hat`` of our own message ``encoded`` (``siq_encode(v, ...)``, from our own ``v``) a
    chunk at a time, recomputed from ``v`` and the message's steps by ``siq_encode``'s own
    operations: the same bits, without keeping ``v_hat`` (``keep_hat=False``) and without
    unpacking the residues. Each chunk is one reused buffer: read it before taking the next.
    Trusted input (ours): not validated."""
    n, block_size = v.numel(), encoded.block_size
    nb = _blocks(n, block_size)
    raw = np.frombuffer(memoryview(encoded.payload), dtype=np.int16, count=nb)
    steps = torch.from_numpy(raw.copy()).view(torch.bfloat16)
    spans = _chunks(n, block_size, chunk)
    buffer = torch.empty(spans[0][1] - spans[0][0] if spans else 0, dtype=torch.float32)
    for i0, i1, b0, b1 in spans:
        yield i0, i1, siq_hat(v[i0:i1], steps[b0:b1], block_size, out=buffer[: i1 - i0])


def _checksums(index: Tensor, block_size: int) -> Tensor:
    n = index.numel()
    pad = (-n) % block_size
    full = torch.remainder(index, _CHECK).to(torch.int64)
    if pad:
        full = torch.nn.functional.pad(full, (0, pad))
    return torch.remainder(full.view(-1, block_size).sum(dim=1), _CHECK).to(torch.uint8)


def siq_decode(
    encoded: Encoded,
    side: Vector,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    chunk: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """The sender's ``v_hat``, recovered with ``side`` (our own vector, 1-D fp32, close to it),
    and a boolean per block: True where the checksum failed (``side`` was out of reach there;
    those blocks' values are not the sender's).

    Raises:
        CorruptPayload: Wrong codec, shape, bit width or length, a bad step, or (unless
            ``limits.allow_nonfinite``) a value that is not finite.
    """
    values = torch.empty(side.numel(), dtype=torch.float32)
    bad = torch.empty(_blocks(side.numel(), max(1, encoded.block_size)), dtype=torch.bool)
    for _, _, b0, b1, _, flags in siq_decode_chunks(
        encoded, side, limits=limits, chunk=chunk, out=values
    ):
        bad[b0:b1] = flags
    return values, bad


SiqChunk = tuple[int, int, int, int, Tensor, Tensor]
"""(first element, end, first block, end block, the chunk's values, its blocks' failed
checksums)."""


def siq_decode_chunks(
    encoded: Encoded,
    side: Vector,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    chunk: int = CHUNK_ELEMENTS,
    out: Tensor | None = None,
) -> Iterator[SiqChunk]:
    """``siq_decode`` a chunk at a time (the same bits): the header is checked before the first
    chunk, each chunk's values as they are decoded. Each chunk's values go into ``out``'s slice
    (1-D fp32 of ``side``'s length; it may be ``side`` itself: a chunk of ``side`` is read before
    its values are written), or without ``out`` into one chunk-sized buffer reused for every chunk
    (read a chunk before taking the next).

    Raises:
        CorruptPayload: as ``siq_decode``, when the chunk that holds the fault is reached.
    """
    name = encoded.name
    if encoded.codec != _NAME:
        raise CorruptPayload(encoded.codec, name, f"expected codec {_NAME!r}")
    bits, block_size = encoded.k_per_chunk, encoded.block_size
    n = side.numel()
    if encoded.shape != (n,) or n > limits.max_numel:
        raise CorruptPayload(_NAME, name, f"shape {encoded.shape}, expected ({n},)")
    if bits not in SIQ_BITS:
        raise CorruptPayload(_NAME, name, f"bit width {bits}, expected one of {SIQ_BITS}")
    if not 1 <= block_size <= 2**31 - 1:
        raise CorruptPayload(_NAME, name, f"block size {block_size}")
    nb = _blocks(n, block_size)
    if len(encoded.payload) != siq_bytes(n, bits, block_size):
        raise CorruptPayload(
            _NAME,
            name,
            f"payload is {len(encoded.payload)} bytes, expected {siq_bytes(n, bits, block_size)}",
        )
    if out is not None and (out.shape != (n,) or out.dtype != torch.float32):
        raise ValueError(f"siq_decode_chunks: out must be ({n},) float32")
    payload = memoryview(encoded.payload)
    raw = np.frombuffer(payload, dtype=np.int16, count=nb)
    steps = torch.from_numpy(raw.copy()).view(torch.bfloat16)
    if not bool(torch.isfinite(steps).all()) or not bool((steps > 0).all()):
        raise CorruptPayload(_NAME, name, "a block step is not a positive finite number")
    sums = np.frombuffer(payload, np.uint8, nb, 2 * nb)
    spans = _chunks(n, block_size, chunk)
    size = spans[0][1] - spans[0][0] if spans else 0
    buffer = out if out is not None else torch.empty(size, dtype=torch.float32)
    modulus = float(2**bits)
    residues = 3 * nb
    for i0, i1, b0, b1 in spans:
        data = payload[residues + i0 * bits // 8 : residues + (i1 * bits + 7) // 8]
        residue = _unpack(data, bits, i1 - i0).double()
        s = _expand(steps[b0:b1], i1 - i0, block_size)
        # The index with this residue nearest to our own position on the lattice:
        # residue + modulus * round((side / s - residue) / modulus), in place on one temporary.
        index = side[i0:i1].double().div_(s).sub_(residue).div_(modulus).round_()
        index.mul_(modulus).add_(residue)
        del residue
        part = buffer[i0:i1] if out is not None else buffer[: i1 - i0]
        part.copy_(s.mul_(index))  # index * s, rounded to float32 as it is stored
        del s
        if not limits.allow_nonfinite and not bool(torch.isfinite(part).all()):
            raise CorruptPayload(_NAME, name, "a decoded value is not finite")
        expected = torch.from_numpy(sums[b0:b1].copy())
        yield i0, i1, b0, b1, part, _checksums(index, block_size) != expected


def _pack(residue: Tensor, bits: int) -> bytes:
    r = residue.numpy()
    if bits == 16:
        return r.astype("<u2").tobytes()
    if bits == 8:
        return r.astype(np.uint8).tobytes()
    per = 8 // bits
    padded = np.zeros(math.ceil(len(r) / per) * per, dtype=np.uint8)
    padded[: len(r)] = r
    grouped = padded.reshape(-1, per)
    out = np.zeros(len(grouped), dtype=np.uint8)
    for k in range(per):
        out |= grouped[:, k] << np.uint8(bits * k)
    return out.tobytes()


def _unpack(data: bytes | memoryview, bits: int, n: int) -> Tensor:
    if bits == 16:
        return torch.from_numpy(np.frombuffer(data, dtype="<u2").astype(np.int64))
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    per = 8 // bits
    mask = np.uint8(2**bits - 1)
    parts = [(raw >> np.uint8(bits * k)) & mask for k in range(per)]
    return torch.from_numpy(np.stack(parts, axis=1).reshape(-1)[:n].astype(np.int64))
