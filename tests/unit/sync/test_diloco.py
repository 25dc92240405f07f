"""DiLoCo outer step: algorithms.md T1 (Nesterov), T2 (heavy-ball), torch SGD parity, config."""

from __future__ import annotations

import pytest
import torch

from locoswarm.errors import ConfigError
from locoswarm.sync.diloco import (
    DiLoCoConfig,
    diloco_outer_step,
    group_mean,
    heavy_ball_outer_step,
    nesterov_outer_step,
    outer_grad,
)

ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def _t(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, _t(expected, actual.dtype), atol=ATOL[actual.dtype], rtol=0)


def _t1_t2_steps(cfg: DiLoCoConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    phi = _t([1.0, 2.0], dtype)
    thetas = [_t([0.8, 2.2], dtype), _t([0.6, 1.8], dtype)]
    g1 = group_mean([outer_grad(phi, th) for th in thetas])
    _close(g1, [0.3, 0.0])
    phi1, buf1 = diloco_outer_step(phi, g1, None, cfg)
    phi2, _ = diloco_outer_step(phi1, _t([0.1, 0.1], dtype), buf1, cfg)
    return phi1, phi2


@pytest.mark.parametrize("dtype", DTYPES)
def test_t1_nesterov_two_steps(dtype):
    phi = _t([1.0, 2.0], dtype)
    g1 = group_mean(
        [outer_grad(phi, _t([0.8, 2.2], dtype)), outer_grad(phi, _t([0.6, 1.8], dtype))]
    )
    phi1, buf1 = nesterov_outer_step(phi, g1, None, lr=0.7, momentum=0.9)
    _close(buf1, [0.3, 0.0])
    _close(phi1, [0.601, 2.0])
    phi2, buf2 = nesterov_outer_step(phi1, _t([0.1, 0.1], dtype), buf1, lr=0.7, momentum=0.9)
    _close(buf2, [0.37, 0.1])
    _close(phi2, [0.2979, 1.867])


@pytest.mark.parametrize("dtype", DTYPES)
def test_t1_through_config_dispatch(dtype):
    phi1, phi2 = _t1_t2_steps(DiLoCoConfig(lr=0.7, momentum=0.9, nesterov=True), dtype)
    _close(phi1, [0.601, 2.0])
    _close(phi2, [0.2979, 1.867])


@pytest.mark.parametrize("dtype", DTYPES)
def test_t2_heavy_ball_two_steps(dtype):
    phi1, phi2 = _t1_t2_steps(DiLoCoConfig(lr=0.7, momentum=0.3, nesterov=False), dtype)
    _close(phi1, [0.79, 2.0])
    _close(phi2, [0.657, 1.93])


def test_t2_heavy_ball_buffer_values():
    phi = _t([1.0, 2.0], torch.float64)
    phi1, gm1 = heavy_ball_outer_step(
        phi, _t([0.3, 0.0], torch.float64), None, lr=0.7, momentum=0.3
    )
    _close(gm1, [-0.21, 0.0])
    _, gm2 = heavy_ball_outer_step(phi1, _t([0.1, 0.1], torch.float64), gm1, lr=0.7, momentum=0.3)
    _close(gm2, [-0.133, -0.07])


def test_t1_and_t2_differ():
    nesterov = _t1_t2_steps(DiLoCoConfig(lr=0.7, momentum=0.3, nesterov=True), torch.float64)
    heavy = _t1_t2_steps(DiLoCoConfig(lr=0.7, momentum=0.3, nesterov=False), torch.float64)
    assert not torch.allclose(nesterov[0], heavy[0])
    assert not torch.allclose(nesterov[1], heavy[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.9, 0.3])
def test_nesterov_matches_torch_sgd_bitwise(dtype, momentum):
    gen = torch.Generator().manual_seed(1234)
    init = torch.randn(3, 5, generator=gen, dtype=dtype)
    param = torch.nn.Parameter(init.clone())
    opt = torch.optim.SGD([param], lr=0.7, momentum=momentum, nesterov=True, foreach=False)
    phi, buf = init.clone(), None
    for _ in range(6):
        g = torch.randn(3, 5, generator=gen, dtype=dtype)
        param.grad = g.clone()
        opt.step()
        phi, buf = nesterov_outer_step(phi, g, buf, lr=0.7, momentum=momentum)
        assert torch.equal(phi, param.detach())
        assert torch.equal(buf, opt.state[param]["momentum_buffer"])


def test_functions_do_not_modify_inputs():
    gen = torch.Generator().manual_seed(7)
    phi, g, buf = (torch.randn(4, generator=gen) for _ in range(3))
    copies = [phi.clone(), g.clone(), buf.clone()]
    for step in (nesterov_outer_step, heavy_ball_outer_step):
        for b in (None, buf):
            new_phi, new_buf = step(phi, g, b, lr=0.7, momentum=0.9)
            assert new_phi.data_ptr() not in {phi.data_ptr(), g.data_ptr(), buf.data_ptr()}
            assert new_buf.data_ptr() not in {phi.data_ptr(), g.data_ptr(), buf.data_ptr()}
    tensors = [phi, g]
    mean = group_mean(tensors)
    assert mean.data_ptr() not in {phi.data_ptr(), g.data_ptr()}
    for before, after in zip(copies, [phi, g, buf], strict=True):
        assert torch.equal(before, after)


def test_single_worker_lr1_no_momentum_equals_local_training():
    phi = torch.tensor([1.0, -2.0, 3.5])
    theta = torch.tensor([0.25, -1.5, 4.0])
    g = group_mean([outer_grad(phi, theta)])
    for nesterov in (True, False):
        cfg = DiLoCoConfig(lr=1.0, momentum=0.0, nesterov=nesterov)
        new_phi, _ = diloco_outer_step(phi, g, None, cfg)
        assert torch.equal(new_phi, theta)


def test_group_mean_order_and_shape():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 9.0])
    assert torch.equal(group_mean([a, b, c]), ((a + b) + c) / 3)
    assert torch.equal(group_mean([a]), a)
    assert group_mean([torch.ones(2, 3, 4)] * 2).shape == (2, 3, 4)


def test_group_mean_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="at least one"):
        group_mean([])
    with pytest.raises(ValueError, match="shape"):
        group_mean([torch.zeros(2), torch.zeros(3)])


def test_config_defaults():
    cfg = DiLoCoConfig()
    assert (cfg.inner_steps, cfg.lr, cfg.momentum, cfg.nesterov, cfg.group_size) == (
        500,
        0.7,
        0.9,
        True,
        None,
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_config_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DiLoCoConfig(**kwargs)


def test_config_accepts_edges():
    DiLoCoConfig(momentum=0.0, group_size=1, inner_steps=1)
