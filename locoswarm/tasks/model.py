"""A small decoder-only transformer over bytes (vocabulary 256): the default task's model.

Llama-shaped (RMSNorm, SwiGLU MLP, causal attention, tied input/output embedding) with learned
position embeddings. Knows nothing about data, replicas or how training is synchronised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locoswarm.errors import ConfigError

VOCAB_SIZE = 256
"""Byte-level vocabulary: one token per byte value."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the byte transformer."""

    dim: int
    """Width of the residual stream."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads; must divide dim."""
    ffn_dim: int
    """Hidden width of the SwiGLU MLP."""
    seq_len: int
    """Longest context the position embedding covers."""

    def __post_init__(self) -> None:
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must divide model.dim ({self.dim})"
            )


MODEL_SIZES: dict[str, ModelConfig] = {
    # About 0.27M parameters: fast enough for 8 CPU replicas in tests and benchmarks.
    "tiny": ModelConfig(dim=64, num_layers=4, num_heads=4, ffn_dim=256, seq_len=128),
    # About 10M parameters.
    "small": ModelConfig(dim=256, num_layers=10, num_heads=8, ffn_dim=1024, seq_len=256),
    # The NoLoCo paper's "Small" shape (hidden 768, 12 layers, FFN 3072, 12 heads, seq 1024). With a
    # 256-byte vocabulary instead of Llama-3's 128k it has about 114M parameters, not 125M.
    "base": ModelConfig(dim=768, num_layers=12, num_heads=12, ffn_dim=3072, seq_len=1024),
}


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(c, dim=-1)
        shape = (b, t, self.num_heads, c // self.num_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        out: Tensor = x + self.down(F.silu(gate) * up)
        return out


class ByteTransformer(nn.Module):
    """Decoder-only transformer mapping byte ids [B, T] to next-byte logits [B, T, 256]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.apply(self._init)
        # GPT-2 style: scale the residual projections down with depth.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.num_layers) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {t} bytes exceeds the model's seq_len {self.cfg.seq_len}"
            )
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.norm(x) @ self.tok.weight.T
        return logits


def next_byte_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy (nats per byte) of the model's next-byte predictions."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
