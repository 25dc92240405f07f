"""The swarm's compressed modes: ef pairs and DiLoCo with a codec, bytes from real payloads."""

from __future__ import annotations

import pytest
import torch

from locoswarm.compression import get_codec
from locoswarm.compression.config import CompressionConfig
from locoswarm.compression.error_feedback import EF14
from locoswarm.errors import ConfigError
from locoswarm.sim.config import SimConfig
from locoswarm.sim.swarm import Swarm
from locoswarm.tasks.task import TaskConfig

TASK = TaskConfig(name="tiny", batch_size=2, seq_len=16, val_batches=1, max_bytes=50_000)


def _cfg(strategy: str, codec: str, feedback: str = "ef14", **kw: object) -> SimConfig:
    base: dict[str, object] = {
        "strategy": strategy,
        "num_replicas": 4,
        "rounds": 3,
        "inner_steps": 2,
        "task": TASK,
        "compression": CompressionConfig(codec=codec, error_feedback=feedback),
    }
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


def _payload_bytes(codec: str, numel: int) -> int:
    return get_codec(codec).encode(torch.zeros(numel)).num_bytes


@pytest.mark.parametrize("codec", ["int4", "sign", "int8", "topk"])
def test_ef_counts_the_real_encoded_payload(codec: str) -> None:
    swarm = Swarm(_cfg("ef", codec))
    result = swarm.run().to_dict()["final"]
    per_round = _payload_bytes(codec, swarm.num_parameters)
    assert result["bytes_sent_per_replica"] == [3.0 * per_round] * 4
    assert per_round * 8 < swarm.num_parameters * 32  # compressed below fp32


def test_ef_with_error_feedback_keeps_residuals() -> None:
    swarm = Swarm(_cfg("ef", "int4"))
    swarm.run()
    for fb in swarm._feedback:
        assert isinstance(fb, EF14)
        assert float(fb.residual["params"].abs().sum()) > 0


def test_diloco_with_a_codec_keeps_replicas_identical() -> None:
    swarm = Swarm(_cfg("diloco", "int8"))
    result = swarm.run().to_dict()["final"]
    assert result["spread"] == pytest.approx(0.0, abs=1e-7)
    per_round = 2 * 3 / 4 * _payload_bytes("int8", swarm.num_parameters)
    assert result["bytes_sent_per_replica"] == [pytest.approx(3 * per_round)] * 4


def test_diloco_with_econtrol_runs() -> None:
    result = Swarm(_cfg("diloco", "sign", "econtrol")).run().to_dict()["final"]
    assert all(torch.isfinite(torch.tensor(result["val_loss_per_replica"])))


def test_a_replica_that_misses_a_round_keeps_its_progress_in_the_residual() -> None:
    swarm = Swarm(_cfg("ef", "int8", rounds=1, miss_prob=0.999))
    swarm.run()
    for rep, fb in zip(swarm.replicas, swarm._feedback, strict=True):
        assert isinstance(fb, EF14)
        # Missed: phi did not move, theta restarted from it, the pseudo-gradient is in e.
        assert torch.equal(rep.theta(), rep.phi)
        assert float(fb.residual["params"].abs().sum()) > 0
    assert swarm.bytes_sent == [0.0] * 4


def test_invalid_combinations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="diloco and ef only"):
        _cfg("noloco", "int8")
    with pytest.raises(ConfigError, match="econtrol"):
        _cfg("ef", "int8", "econtrol")
    with pytest.raises(ConfigError, match=r"compression\.codec"):
        CompressionConfig(codec="zstd")
