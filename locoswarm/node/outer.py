"""The node's outer step: what goes on the wire for each sync mode, and what comes back.

``prepare`` turns this round's theta into an outgoing payload (and, for compressed modes, an
error-feedback ``Pending``); ``apply`` takes the partner's decoded tensors and returns the new
slow weights; ``solo`` is the step without a partner. The maths lives in ``sync/`` and
``compression/``; this module only wires them to the wire format of ``protocol/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from locoswarm.compression.codecs import decode, get_codec
from locoswarm.compression.encoded import DecodeLimits, Encoded
from locoswarm.compression.error_feedback import ErrorFeedback, Pending, make_feedback
from locoswarm.errors import ProtocolViolation
from locoswarm.node.config import NodeConfig
from locoswarm.protocol import Header, Outgoing, Received, TensorSpec
from locoswarm.sync.diloco import DiLoCoConfig, diloco_outer_step, group_mean, outer_grad
from locoswarm.sync.noloco import noloco_outer_step

STATE_NAMES = ("phi", "momentum")


@dataclass
class Prepared:
    """One round's outgoing message and what we need to finish the step."""

    outer_step: int
    theta: Tensor
    outgoing: Outgoing
    pending: Pending | None


def fingerprint(config: NodeConfig, shapes: list[tuple[int, ...]]) -> str:
    """Nodes exchange only with nodes whose fingerprint matches: same task, model shapes,
    initial-weight seed, sync mode and message layout."""
    text = "|".join(
        (
            config.task.name,
            str(shapes),
            str(config.trainer.seed),
            config.sync.mode,
            str(config.sync.mode == "noloco" and _theta_only(config)),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _theta_only(config: NodeConfig) -> bool:
    return config.sync.gamma is None or config.sync.gamma == config.sync.lr


def _spec(encoded: Encoded, name: str) -> TensorSpec:
    return TensorSpec(
        name=name,
        codec=encoded.codec,
        dtype=encoded.dtype,
        shape=encoded.shape,
        num_bytes=encoded.num_bytes,
        block_size=encoded.block_size,
        k_per_chunk=encoded.k_per_chunk,
    )


class OuterStep:
    """Outer state (phi, momentum, error feedback) and the round's maths for one sync mode."""

    def __init__(self, config: NodeConfig, phi: Tensor, *, peer_id: str, fp: str) -> None:
        self.config = config
        self.mode = config.sync.mode
        self.peer_id = peer_id
        self.fingerprint = fp
        self.phi = phi.clone()
        self.momentum: Tensor | None = None
        self.numel = phi.numel()
        self.limits = DecodeLimits(max_numel=self.numel)
        comp = config.compression
        codec = get_codec(comp.codec, block_size=comp.block_size, topk_ratio=comp.topk_ratio)
        kind = "none" if comp.lossless else comp.error_feedback
        self.feedback: ErrorFeedback = make_feedback(kind, codec, eta=comp.eta)
        self._fp32 = get_codec("fp32")
        self.diloco = DiLoCoConfig(
            lr=config.sync.lr, momentum=config.sync.momentum, nesterov=self.mode == "diloco"
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names of one message, in order."""
        if self.mode == "noloco":
            return ("theta",) if _theta_only(self.config) else ("theta", "phi")
        return ("outer_grad",)

    def header(
        self,
        outer_step: int,
        tensors: tuple[TensorSpec, ...],
        kind: str,
        members: tuple[str, ...] = (),
    ) -> Header:
        return Header(
            run_id=self.config.run_id,
            outer_step=outer_step,
            strategy=self.mode,
            sender_id=self.peer_id,
            model_fingerprint=self.fingerprint,
            tensors=tensors,
            kind=kind,
            members=members,
        )

    def control(self, outer_step: int, kind: str, members: tuple[str, ...] = ()) -> Outgoing:
        """A message without tensors (group join and roster)."""
        return Outgoing(self.header(outer_step, (), kind, members), b"")

    def shard_message(
        self, outer_step: int, kind: str, shard: Tensor, members: tuple[str, ...]
    ) -> Outgoing:
        """One fp32 shard for a group's reduce-scatter or all-gather."""
        encoded = self._fp32.encode(shard.contiguous(), name="shard")
        return Outgoing(
            self.header(outer_step, (_spec(encoded, "shard"),), kind, members), encoded.payload
        )

    def decode_shard(self, received: Received, length: int) -> Tensor:
        """A group member's shard, checked to be ``length`` fp32 values."""
        specs = received.header.tensors
        peer = received.header.sender_id
        if len(specs) != 1 or specs[0].name != "shard" or specs[0].shape != (length,):
            raise ProtocolViolation(
                peer, f"expected one shard of {length} values", reason="rejected"
            )
        spec = specs[0]
        encoded = Encoded(
            codec=spec.codec,
            shape=spec.shape,
            dtype=spec.dtype,
            payload=received.payload,
            block_size=spec.block_size,
            k_per_chunk=spec.k_per_chunk,
            name="shard",
        )
        return decode(encoded, limits=self.limits)

    def apply_mean(self, prepared: Prepared, mean: Tensor) -> Tensor:
        """DiLoCo's outer step on a group's mean outer gradient; returns the new phi."""
        assert prepared.pending is not None  # diloco messages always have one
        self.feedback.commit(prepared.pending)
        self.phi, self.momentum = diloco_outer_step(self.phi, mean, self.momentum, self.diloco)
        return self.phi

    def prepare(self, outer_step: int, theta: Tensor) -> Prepared:
        """Encode this round's message (CPU work: call it from a worker thread)."""
        pending = None
        if self.mode == "noloco":
            parts = [self._fp32.encode(theta, name="theta")]
            if "phi" in self.names:
                parts.append(self._fp32.encode(self.phi, name="phi"))
        else:
            pending = self.feedback.prepare("outer_grad", outer_grad(self.phi, theta))
            parts = [pending.encoded]
        specs = tuple(_spec(e, n) for e, n in zip(parts, self.names, strict=True))
        payload = b"".join(e.payload for e in parts)
        outgoing = Outgoing(self.header(outer_step, specs, "outer"), payload)
        return Prepared(outer_step, theta, outgoing, pending)

    def decode(self, received: Received, names: tuple[str, ...] | None = None) -> list[Tensor]:
        """The partner's tensors, each checked against what this mode expects."""
        names = names or self.names
        specs = received.header.tensors
        peer = received.header.sender_id
        if tuple(s.name for s in specs) != names:
            raise ProtocolViolation(
                peer,
                f"message holds {[s.name for s in specs]}, expected {list(names)}",
                reason="rejected",
            )
        out, offset = [], 0
        view = memoryview(received.payload)
        for spec in specs:
            if spec.shape != (self.numel,):
                raise ProtocolViolation(
                    peer,
                    f"tensor {spec.name} has shape {spec.shape}, ours ({self.numel},)",
                    reason="rejected",
                )
            encoded = Encoded(
                codec=spec.codec,
                shape=spec.shape,
                dtype=spec.dtype,
                payload=bytes(view[offset : offset + spec.num_bytes]),
                block_size=spec.block_size,
                k_per_chunk=spec.k_per_chunk,
                name=spec.name,
            )
            out.append(decode(encoded, limits=self.limits))  # raises CorruptPayload
            offset += spec.num_bytes
        return out

    def apply(self, prepared: Prepared, partner: list[Tensor]) -> Tensor:
        """The outer step with one partner's decoded message; returns the new phi."""
        if self.mode == "noloco":
            thetas = [prepared.theta, partner[0]]
            phis = None if len(partner) == 1 else [self.phi, partner[1]]
            self._noloco(thetas, phis)
        else:
            assert prepared.pending is not None  # prepare() sets it for these modes
            self.feedback.commit(prepared.pending)
            mean = group_mean([prepared.pending.decoded, partner[0]])
            self.phi, self.momentum = diloco_outer_step(self.phi, mean, self.momentum, self.diloco)
        return self.phi

    def solo(self, prepared: Prepared) -> Tensor:
        """The outer step without a partner; returns the new phi."""
        if self.mode == "noloco":
            self._noloco([prepared.theta], None)
        elif self.config.compression.lossless:
            grad = outer_grad(self.phi, prepared.theta)
            self.phi, self.momentum = diloco_outer_step(self.phi, grad, self.momentum, self.diloco)
        else:
            # The residual keeps this round's whole outer gradient; it reaches the swarm with
            # our next message instead of being applied alone (compression.md 3.7).
            assert prepared.pending is not None
            self.feedback.abort(prepared.pending)
        return self.phi

    def _noloco(self, thetas: list[Tensor], phis: list[Tensor] | None) -> None:
        delta = self.momentum if self.momentum is not None else torch.zeros_like(self.phi)
        gamma = self.config.sync.lr if self.config.sync.gamma is None else self.config.sync.gamma
        self.phi, self.momentum = noloco_outer_step(
            self.phi,
            delta,
            thetas,
            phis,
            alpha=self.config.sync.momentum,
            beta=self.config.sync.lr,
            gamma=gamma,
        )

    # -- state for checkpoints and late joiners -------------------------------------------------

    def state_payload(self, outer_step: int) -> Outgoing:
        """phi and momentum as an fp32 payload (FetchState)."""
        momentum = self.momentum if self.momentum is not None else torch.zeros_like(self.phi)
        parts = [
            self._fp32.encode(self.phi, name="phi"),
            self._fp32.encode(momentum, name="momentum"),
        ]
        specs = tuple(_spec(e, n) for e, n in zip(parts, STATE_NAMES, strict=True))
        header = self.header(outer_step, specs, "state")
        return Outgoing(header, b"".join(e.payload for e in parts))

    def load_state_payload(self, received: Received) -> None:
        phi, momentum = self.decode(received, STATE_NAMES)
        self.phi = phi
        self.momentum = momentum if bool(momentum.any()) else None

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi, "momentum": self.momentum, "feedback": self.feedback.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phi = state["phi"]
        self.momentum = state["momentum"]
        self.feedback.load_state_dict(state["feedback"])
