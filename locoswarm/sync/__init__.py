"""sync: pure-torch outer-step maths (DiLoCo, NoLoCo) and deterministic group drawing."""

from locoswarm.sync.diloco import (
    DiLoCoConfig,
    diloco_outer_step,
    group_mean,
    heavy_ball_outer_step,
    nesterov_outer_step,
    outer_grad,
)
from locoswarm.sync.noloco import NoLoCoConfig, noloco_outer_step
from locoswarm.sync.pairing import pairing, reference_permutation

__all__ = [
    "DiLoCoConfig",
    "NoLoCoConfig",
    "diloco_outer_step",
    "group_mean",
    "heavy_ball_outer_step",
    "nesterov_outer_step",
    "noloco_outer_step",
    "outer_grad",
    "pairing",
    "reference_permutation",
]
