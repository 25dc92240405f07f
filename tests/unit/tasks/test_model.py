"""The byte transformer: sizes, shapes, causality and config validation."""

from __future__ import annotations

import pytest
import torch

from locoswarm.errors import ConfigError
from locoswarm.tasks.model import (
    MODEL_SIZES,
    VOCAB_SIZE,
    ByteTransformer,
    ModelConfig,
    count_parameters,
    next_byte_loss,
)


def _meta_count(name: str) -> int:
    with torch.device("meta"):
        return count_parameters(ByteTransformer(MODEL_SIZES[name]))


def test_sizes_match_their_promises() -> None:
    assert _meta_count("tiny") < 500_000
    assert 8e6 < _meta_count("small") < 12e6
    # The NoLoCo paper's Small shape; 114M with a 256-byte vocabulary.
    assert 100e6 < _meta_count("base") < 130e6
    assert MODEL_SIZES["base"].dim == 768
    assert MODEL_SIZES["base"].num_layers == 12


def test_forward_shape_and_initial_loss_near_uniform() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(MODEL_SIZES["tiny"])
    x = torch.randint(0, VOCAB_SIZE, (3, 32))
    assert model(x).shape == (3, 32, VOCAB_SIZE)
    loss = next_byte_loss(model, (x, torch.randint(0, VOCAB_SIZE, (3, 32))))
    # A fresh model predicts close to uniform: ln(256) = 5.545 nats.
    assert abs(float(loss.detach()) - 5.545) < 0.3


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(MODEL_SIZES["tiny"]).eval()
    x = torch.randint(0, VOCAB_SIZE, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % VOCAB_SIZE
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_too_long_sequence_is_a_clear_error() -> None:
    model = ByteTransformer(MODEL_SIZES["tiny"])
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, MODEL_SIZES["tiny"].seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dim": 0}, "model.dim"),
        ({"num_heads": 3}, "must divide"),
        ({"seq_len": -1}, "model.seq_len"),
    ],
)
def test_config_validation(kw: dict[str, int], match: str) -> None:
    base = {"dim": 64, "num_layers": 1, "num_heads": 4, "ffn_dim": 64, "seq_len": 8}
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**base, **kw})
