"""The flat parameter vector the outer step works on, and the updates written back."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from locoswarm.tasks.inner import add_difference, flat_params, set_flat, weights_digest


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


def test_flat_params_is_every_parameter_in_order_as_fp32() -> None:
    model = _model()
    flat = flat_params(model)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert flat.dtype == torch.float32
    assert torch.equal(flat, expected)
    # A copy: training on does not change the snapshot.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(flat, expected)


def test_flat_params_of_a_bf16_model_converts_each_parameter() -> None:
    model = _model(torch.bfloat16)
    flat = flat_params(model)
    assert flat.dtype == torch.float32
    assert torch.equal(
        flat, torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    )


def test_set_flat_and_add_difference_round_trip() -> None:
    model = _model()
    before = flat_params(model)
    set_flat(model, before + 1.0)
    assert torch.equal(flat_params(model), before + 1.0)
    add_difference(model, before, before + 1.0)  # theta += new - old
    assert torch.allclose(flat_params(model), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flat_params_from_cuda_lands_in_pinned_host_memory() -> None:
    model = _model().cuda()
    flat = flat_params(model)
    assert flat.device.type == "cpu"
    assert flat.is_pinned()
    assert torch.equal(flat, torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))


def test_weights_digest_hashes_in_place_the_bytes_of_the_flat_vector() -> None:
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    flat = flat_params(model)
    want = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    assert weights_digest(flat) == want
    assert weights_digest(model.parameters()) == want  # one parameter at a time, no flat copy
    assert weights_digest(p.to(torch.bfloat16) for p in model.parameters()) == weights_digest(
        [p.to(torch.bfloat16).float() for p in model.parameters()]
    )
    assert weights_digest(flat[::2]) == hashlib.sha256(flat[::2].numpy().tobytes()).hexdigest()[:16]
