"""Error feedback: compression error is carried into the next message, never lost.

Two flavours (../shared/spec/compression.md sections 2.4, 2.7, 3.5 and 3.7):

- ``EF14`` (Seide 2014; Karimireddy 2019), sender-side residual only::

      p = value + e;  c = C(p);  e <- p - D(c)          (on commit)

  With ``e_0 = 0``: ``sum_t D(c_t) + e_T = sum_t value_t`` (nothing lost, only delayed).
- ``EControl`` (Gao, Islamov, Stich, ICLR 2024), one compressed message that updates both an error
  term and a gradient estimator ``h``::

      c = C(eta * e + g - h);  h <- h + D(c);  e <- e + g - h      (on commit)

  The receiver keeps the mean of its senders' ``h`` and steps with it; ``x - gamma * e`` then
  follows plain SGD exactly, for any ``eta`` and any codec.

Both are two-phase: ``prepare`` encodes without touching the state, ``commit`` applies the state
change once the partner confirmed it received the message, ``abort`` keeps the whole value when the
exchange failed (EF14: ``e <- p``; EControl: as if an empty message had been delivered). State is
kept per key (a parameter name, or one flat vector) in fp32, and checkpoints through
``state_dict`` / ``load_state_dict``.

Knows codecs only through the ``Codec`` protocol; knows nothing about peers, the network or which
outer algorithm consumes the decoded values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from locoswarm.compression.encoded import Codec, Encoded
from locoswarm.errors import ConfigError

FeedbackKind = Literal["none", "ef14", "econtrol"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("none", "ef14", "econtrol")


@dataclass(frozen=True, kw_only=True, slots=True)
class Pending:
    """A prepared message: what goes on the wire and what the partner will reconstruct."""

    key: str
    encoded: Encoded
    """The message to send."""
    decoded: Tensor
    """``D(C(p))``: exactly what a receiver decodes from ``encoded`` (fp32)."""
    value: Tensor
    """The caller's value for this step (the pseudo-gradient)."""
    compressed_input: Tensor
    """``p``, the tensor that was compressed."""


class ErrorFeedback(Protocol):
    """What the outer-step orchestration needs from an error-feedback flavour."""

    def prepare(self, key: str, value: Tensor) -> Pending: ...
    def commit(self, pending: Pending) -> None: ...
    def abort(self, pending: Pending) -> None: ...
    def state_dict(self) -> dict[str, dict[str, Tensor]]: ...
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None: ...


def _encode(codec: Codec, key: str, p: Tensor, value: Tensor) -> Pending:
    encoded = codec.encode(p, name=key)
    return Pending(
        key=key, encoded=encoded, decoded=codec.decode(encoded), value=value, compressed_input=p
    )


def _fp32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32)


class NoFeedback:
    """Plain compression: each message is ``C(value)`` and its error is dropped."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def prepare(self, key: str, value: Tensor) -> Pending:
        value = _fp32(value)
        return _encode(self.codec, key, value, value)

    def commit(self, pending: Pending) -> None:
        del pending

    def abort(self, pending: Pending) -> None:
        del pending

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        if state:
            raise ConfigError("error feedback 'none' has no state to load")


class EF14:
    """Classic sender-side error feedback; the residual is stored in value units."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: dict[str, Tensor] = {}

    def prepare(self, key: str, value: Tensor) -> Pending:
        value = _fp32(value)
        e = self.residual.get(key)
        p = value if e is None else value + e
        return _encode(self.codec, key, p, value)

    def commit(self, pending: Pending) -> None:
        self.residual[pending.key] = pending.compressed_input - pending.decoded

    def abort(self, pending: Pending) -> None:
        # Nothing reached the partner: the residual keeps the whole compressed input.
        self.residual[pending.key] = pending.compressed_input.clone()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"residual": {k: v.clone() for k, v in self.residual.items()}}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.residual = {k: _fp32(v).clone() for k, v in state.get("residual", {}).items()}


class EControl:
    """EControl's sender side: error term ``e`` and gradient estimator ``h`` per key."""

    def __init__(self, codec: Codec, *, eta: float) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"compression.eta must be in [0, 1], got {eta}")
        self.codec = codec
        self.eta = eta
        self.error: dict[str, Tensor] = {}
        self.estimate: dict[str, Tensor] = {}

    def prepare(self, key: str, value: Tensor) -> Pending:
        g = _fp32(value)
        e = self.error.get(key, torch.zeros_like(g))
        h = self.estimate.get(key, torch.zeros_like(g))
        return _encode(self.codec, key, self.eta * e + g - h, g)

    def commit(self, pending: Pending) -> None:
        self._update(pending, pending.decoded)

    def abort(self, pending: Pending) -> None:
        # As if an empty message had been delivered: h stays, and e absorbs all of g - h.
        self._update(pending, torch.zeros_like(pending.decoded))

    def _update(self, pending: Pending, delta: Tensor) -> None:
        g = pending.value
        e = self.error.get(pending.key, torch.zeros_like(g))
        h = self.estimate.get(pending.key, torch.zeros_like(g)) + delta
        self.estimate[pending.key] = h
        self.error[pending.key] = e + g - h

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {
            "error": {k: v.clone() for k, v in self.error.items()},
            "estimate": {k: v.clone() for k, v in self.estimate.items()},
        }

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.error = {k: _fp32(v).clone() for k, v in state.get("error", {}).items()}
        self.estimate = {k: _fp32(v).clone() for k, v in state.get("estimate", {}).items()}


def make_feedback(kind: str, codec: Codec, *, eta: float = 0.5) -> ErrorFeedback:
    """The error-feedback flavour ``kind`` ("none", "ef14" or "econtrol") around ``codec``."""
    if kind == "none":
        return NoFeedback(codec)
    if kind == "ef14":
        return EF14(codec)
    if kind == "econtrol":
        return EControl(codec, eta=eta)
    raise ConfigError(f"compression.error_feedback must be one of {FEEDBACK_KINDS}, got {kind!r}")
