"""Node config loading (file < environment < flags, unknown keys) and atomic checkpoints."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from locoswarm.errors import CheckpointError, ConfigError
from locoswarm.node import checkpoint
from locoswarm.node.config import load_config, to_dict


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'run_id = "from-file"\n[sync]\nmode = "diloco"\ninner_steps = 7\n'
        '[trainer.inner]\nlr = 0.01\n[peers]\ninitial_peers = ["/ip4/1.2.3.4/tcp/1/p2p/x"]\n'
    )
    env = {"LOCOSWARM_SYNC__INNER_STEPS": "9", "LOCOSWARM_RUN_ID": "from-env", "HOME": "/x"}
    config = load_config(toml, {"run_id": "from-flag"}, env)
    assert config.run_id == "from-flag"
    assert config.sync.mode == "diloco"
    assert config.sync.inner_steps == 9
    assert config.trainer.inner.lr == 0.01
    assert config.peers.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/x",)
    assert to_dict(config)["sync"]["inner_steps"] == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sync.inner_stepz": 3}, "unknown config key 'sync.inner_stepz'"),
        ({"nonsense": 1}, "unknown config key 'nonsense'"),
        ({"sync.inner_steps": "many"}, "sync.inner_steps: cannot use 'many' as int"),
        ({"sync.mode": "allreduce"}, "sync.mode must be one of"),
        ({"sync.overlap": "maybe"}, "sync.overlap"),
        ({"sync.mode": "noloco", "compression.codec": "int8"}, "noloco sends weights"),
        ({"sync.mode": "ef", "sync.group_size": 3}, "groups are for diloco"),
        (
            {"protocol.tls.cert_file": "/no/such.pem", "protocol.tls.key_file": "/no/k"},
            "no such file",
        ),
    ],
)
def test_bad_settings_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides, {})


def test_a_bad_toml_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sync\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad, {}, {})
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml", {}, {})


def _state(step: int) -> dict[str, object]:
    return {"outer_step": step, "trainer": {"w": torch.full((3,), float(step))}}


def test_checkpoints_are_atomic_pruned_and_a_corrupt_one_falls_back(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-000000002.pt",
        "round-000000003.pt",
    ]
    found = checkpoint.load_latest(tmp_path)
    assert found is not None
    assert found[1]["outer_step"] == 3
    checkpoint.path_for(tmp_path, 3).write_bytes(b"garbage, as after a crash mid-write")
    found = checkpoint.load_latest(tmp_path)
    assert found is not None
    assert found[1]["outer_step"] == 2
    assert torch.equal(found[1]["trainer"]["w"], torch.full((3,), 2.0))


def test_no_loadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    assert checkpoint.load_latest(tmp_path / "none") is None
    checkpoint.path_for(tmp_path, 1).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        checkpoint.load_latest(tmp_path)


def test_checkpoints_refuse_pickled_objects(tmp_path: Path) -> None:
    torch.save({"outer_step": 5, "x": Fraction(1, 3)}, checkpoint.path_for(tmp_path, 5))
    checkpoint.save(tmp_path, 4, _state(4), keep=5)
    found = checkpoint.load_latest(tmp_path)
    assert found is not None
    assert found[1]["outer_step"] == 4  # weights_only=True refused the pickled object
