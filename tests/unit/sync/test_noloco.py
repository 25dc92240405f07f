"""NoLoCo outer step: algorithms.md T3-T6, fixed point, solo step, config."""

from __future__ import annotations

import pytest
import torch

from locoswarm.errors import ConfigError
from locoswarm.sync.diloco import group_mean, heavy_ball_outer_step, outer_grad
from locoswarm.sync.noloco import NoLoCoConfig, noloco_outer_step

ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
CODE = {"alpha": 0.5, "beta": 0.7, "gamma": 0.7}


def _t(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _close(actual: torch.Tensor, expected: list[float] | torch.Tensor) -> None:
    want = expected if isinstance(expected, torch.Tensor) else _t(expected, actual.dtype)
    torch.testing.assert_close(actual, want, atol=ATOL[actual.dtype], rtol=0)


def _t3_inputs(dtype: torch.dtype):
    phi_a, theta_a = _t([1.0, 0.0], dtype), _t([0.9, 0.2], dtype)
    phi_b, theta_b = _t([1.2, -0.2], dtype), _t([1.0, 0.0], dtype)
    return phi_a, theta_a, phi_b, theta_b


def _pair_step(dtype, *, theta_only: bool, **coeffs):
    phi_a, theta_a, phi_b, theta_b = _t3_inputs(dtype)
    zero = torch.zeros(2, dtype=dtype)
    thetas, phis = [theta_a, theta_b], [phi_a, phi_b]
    wire_phis = None if theta_only else phis
    a = noloco_outer_step(phi_a, zero, thetas, wire_phis, **coeffs)
    b = noloco_outer_step(phi_b, zero, thetas, wire_phis, **coeffs)
    return a, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("theta_only", [False, True])
def test_t3_pair_update(dtype, theta_only):
    (phi_a, delta_a), (phi_b, delta_b) = _pair_step(dtype, theta_only=theta_only, **CODE)
    _close(delta_a, [-0.035, 0.07])
    _close(phi_a, [0.965, 0.07])
    _close(delta_b, [-0.175, 0.21])
    _close(phi_b, [1.025, 0.01])


@pytest.mark.parametrize("theta_only", [False, True])
def test_t3_properties(theta_only):
    (phi_a, _), (phi_b, _) = _pair_step(torch.float64, theta_only=theta_only, **CODE)
    # phi_A' - phi_B' = (1 - gamma)(phi_A - phi_B) with zero momentum.
    _close(phi_a - phi_b, [-0.06, 0.06])
    _close(phi_a - phi_b, (1 - 0.7) * _t([-0.2, 0.2]))
    # The gamma terms cancel in the pair mean: mean(phi') = mean(phi) + beta * mean(delta).
    _close((phi_a + phi_b) / 2, [0.995, 0.04])


def test_t3_pair_mean_property_any_gamma_and_momentum():
    phi_a, theta_a, phi_b, theta_b = _t3_inputs(torch.float64)
    d_a, d_b = _t([0.01, -0.02]), _t([0.03, 0.05])
    mean_delta = ((theta_a - phi_a) + (theta_b - phi_b)) / 2
    for gamma in (0.0, 0.3, 0.7, 1.0, 1.4):
        kw = {"alpha": 0.5, "beta": 0.7, "gamma": gamma}
        new_a, _ = noloco_outer_step(phi_a, d_a, [theta_a, theta_b], [phi_a, phi_b], **kw)
        new_b, _ = noloco_outer_step(phi_b, d_b, [theta_a, theta_b], [phi_a, phi_b], **kw)
        expected = (phi_a + phi_b) / 2 + 0.5 * (d_a + d_b) / 2 + 0.7 * mean_delta
        _close((new_a + new_b) / 2, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("theta_only", [False, True])
def test_t4_carried_momentum_new_partner(dtype, theta_only):
    phi_a, delta_a, theta_a = (
        _t([0.965, 0.07], dtype),
        _t([-0.035, 0.07], dtype),
        _t([0.9, 0.1], dtype),
    )
    phi_c, theta_c = _t([0.9, 0.1], dtype), _t([0.85, 0.2], dtype)
    phis = None if theta_only else [phi_a, phi_c]
    new_phi, new_delta = noloco_outer_step(phi_a, delta_a, [theta_a, theta_c], phis, **CODE)
    _close(new_delta, [-0.0805, 0.091])
    _close(new_phi, [0.8845, 0.161])


@pytest.mark.parametrize("dtype", DTYPES)
def test_t5_decoupled_gamma(dtype):
    (phi_a, delta_a), (phi_b, delta_b) = _pair_step(
        dtype, theta_only=False, alpha=0.5, beta=0.7, gamma=1.0
    )
    _close(delta_a, [-0.005, 0.04])
    _close(delta_b, [-0.205, 0.24])
    _close(phi_a, [0.995, 0.04])
    _close(phi_b, [0.995, 0.04])


def test_t5_theta_only_rejects_decoupled_gamma():
    phi_a, theta_a, _, theta_b = _t3_inputs(torch.float64)
    with pytest.raises(ConfigError, match="gamma == beta"):
        noloco_outer_step(
            phi_a, torch.zeros(2), [theta_a, theta_b], None, alpha=0.5, beta=0.7, gamma=1.0
        )


def test_t6_full_group_identical_phi_equals_heavy_ball_bitwise():
    gen = torch.Generator().manual_seed(6)
    phi = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    phi_nl, delta = phi.clone(), torch.zeros_like(phi)
    phi_hb, buf = phi.clone(), None
    for _ in range(4):
        thetas = [
            phi_nl + 0.1 * torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(4)
        ]
        phi_nl, delta = noloco_outer_step(
            phi_nl, delta, thetas, [phi_nl] * 4, alpha=0.3, beta=0.7, gamma=0.7
        )
        g = group_mean([outer_grad(phi_hb, th) for th in thetas])
        phi_hb, buf = heavy_ball_outer_step(phi_hb, g, buf, lr=0.7, momentum=0.3)
        assert torch.equal(phi_nl, phi_hb)
        assert torch.equal(delta, buf)


@pytest.mark.parametrize("theta_only", [False, True])
def test_identical_replicas_are_a_fixed_point(theta_only):
    phi = torch.randn(5, generator=torch.Generator().manual_seed(3))
    phis = None if theta_only else [phi, phi.clone()]
    new_phi, new_delta = noloco_outer_step(
        phi, torch.zeros(5), [phi.clone(), phi.clone()], phis, **CODE
    )
    assert torch.equal(new_phi, phi)
    assert torch.equal(new_delta, torch.zeros(5))


def test_solo_step_equals_single_worker_heavy_ball():
    gen = torch.Generator().manual_seed(11)
    phi_nl = torch.randn(6, generator=gen, dtype=torch.float64)
    phi_hb, delta, buf = phi_nl.clone(), torch.zeros(6, dtype=torch.float64), None
    for _ in range(3):
        theta = phi_nl + torch.randn(6, generator=gen, dtype=torch.float64)
        phi_nl, delta = noloco_outer_step(
            phi_nl, delta, [theta], [phi_nl], alpha=0.5, beta=0.7, gamma=1.3
        )
        phi_hb, buf = heavy_ball_outer_step(
            phi_hb, outer_grad(phi_hb, theta), buf, lr=0.7, momentum=0.5
        )
        assert torch.equal(phi_nl, phi_hb)
        assert torch.equal(delta, buf)


def test_inputs_are_not_modified():
    phi_a, theta_a, phi_b, theta_b = _t3_inputs(torch.float32)
    delta = _t([0.1, 0.2], torch.float32)
    inputs = [phi_a, theta_a, phi_b, theta_b, delta]
    copies = [x.clone() for x in inputs]
    for phis in (None, [phi_a, phi_b]):
        new_phi, new_delta = noloco_outer_step(phi_a, delta, [theta_a, theta_b], phis, **CODE)
        ptrs = {x.data_ptr() for x in inputs}
        assert new_phi.data_ptr() not in ptrs
        assert new_delta.data_ptr() not in ptrs
    for before, after in zip(copies, inputs, strict=True):
        assert torch.equal(before, after)


def test_rejects_empty_group():
    with pytest.raises(ValueError, match="at least"):
        noloco_outer_step(torch.zeros(2), torch.zeros(2), [], None, **CODE)


def test_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 thetas but 1 phis"):
        noloco_outer_step(
            torch.zeros(2), torch.zeros(2), [torch.zeros(2)] * 2, [torch.zeros(2)], **CODE
        )


def test_config_defaults_and_properties():
    cfg = NoLoCoConfig()
    assert (cfg.inner_steps, cfg.alpha, cfg.beta, cfg.gamma, cfg.group_size) == (
        50,
        0.5,
        0.7,
        None,
        2,
    )
    assert cfg.effective_gamma == 0.7
    assert cfg.theta_only
    assert NoLoCoConfig(gamma=0.7).theta_only
    decoupled = NoLoCoConfig(gamma=1.0)
    assert decoupled.effective_gamma == 1.0
    assert not decoupled.theta_only


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"gamma": -0.5}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_config_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        NoLoCoConfig(**kwargs)


def test_config_accepts_edges():
    NoLoCoConfig(inner_steps=1, alpha=0.0, gamma=0.0, group_size=1)
