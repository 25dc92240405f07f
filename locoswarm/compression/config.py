"""Configuration of what is compressed on the wire and how its error is fed back.

Knows codec and error-feedback names only; nothing about peers or the outer algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

from locoswarm.errors import ConfigError

CODEC_CHOICES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4", "sign", "topk")
FEEDBACK_CHOICES: tuple[str, ...] = ("none", "ef14", "econtrol")


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionConfig:
    """Codec for outer-step payloads and the error feedback around it."""

    codec: str = "fp32"
    """fp32 (none), fp16, bf16, int8, int4, sign or topk."""
    block_size: int = 4096
    """Elements per scale block for int8, int4 and sign."""
    topk_ratio: float = 0.01
    """Share of elements topk keeps."""
    error_feedback: str = "ef14"
    """none, ef14 (sender-side residual) or econtrol; ignored for the lossless fp32 codec."""
    eta: float = 0.5
    """EControl's feedback strength, in [0, 1]."""

    def __post_init__(self) -> None:
        if self.codec not in CODEC_CHOICES:
            raise ConfigError(
                f"compression.codec must be one of {CODEC_CHOICES}, got {self.codec!r}"
            )
        if self.error_feedback not in FEEDBACK_CHOICES:
            raise ConfigError(
                f"compression.error_feedback must be one of {FEEDBACK_CHOICES}, "
                f"got {self.error_feedback!r}"
            )
        if self.block_size < 1:
            raise ConfigError(f"compression.block_size must be >= 1, got {self.block_size}")
        if not 0 < self.topk_ratio <= 1:
            raise ConfigError(f"compression.topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if not 0 <= self.eta <= 1:
            raise ConfigError(f"compression.eta must be in [0, 1], got {self.eta}")

    @property
    def lossless(self) -> bool:
        """True when payloads go uncompressed (fp32)."""
        return self.codec == "fp32"
