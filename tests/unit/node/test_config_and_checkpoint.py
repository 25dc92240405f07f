"""Node config loading (file < environment < flags, unknown keys), the sync section's round
config, ``locoswarm run``'s flags and atomic checkpoints."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from locoswarm.errors import CheckpointError, ConfigError
from locoswarm.node import checkpoint
from locoswarm.node.cli import build_parser
from locoswarm.node.config import SyncMode, load_config
from locoswarm.node.presets import preset
from locoswarm.node.run import config_from_args, overrides_from_args
from locoswarm.settings import to_dict
from locoswarm.sync.round_config import default_round_config


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
        ({"sync.bits": 3}, "sync.bits must be 32 or one of"),
        ({"sync.mode": "diloco", "sync.group_size": 3, "sync.bits": 16}, "average fp32"),
        ({"sync.mode": "ef", "sync.group_size": 3}, "groups are for diloco"),
        ({"sync.mode": "ef", "sync.bits": 32}, "sync.bits must be below 32"),
        ({"sync.mode": "ef", "sync.design": "push"}, "sync.design must be siq or pull"),
        ({"sync.block_size": 0}, "sync.block_size"),
        # Removed: the compression section (the round's codec is sync.codec) and the fixed delay.
        ({"compression.codec": "int8"}, "unknown config key 'compression'"),
        ({"sync.apply_delay_steps": 5}, "unknown config key 'sync.apply_delay_steps'"),
        ({"peers.pairing": "ring"}, "peers.pairing must be one of random, hypercube"),
        (
            {"protocol.tls.cert_file": "/no/such.pem", "protocol.tls.key_file": "/no/k"},
            "no such file",
        ),
    ],
)
def test_bad_settings_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides, {})


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_sync_round_config_defaults_are_the_modes(mode: SyncMode) -> None:
    config = load_config(None, {"sync.mode": mode}, {})
    assert config.sync.round_config == default_round_config(mode)
    assert (config.sync.lr, config.sync.momentum) == (
        default_round_config(mode).lr,
        default_round_config(mode).momentum,
    )


def test_sync_keys_reach_the_round_config() -> None:
    ef = load_config(
        None,
        {
            "sync.mode": "ef",
            "sync.bits": "2",
            "sync.block_size": "32",
            "sync.error_feedback": "false",
            "sync.outer_lr": "0.5",
        },
        {},
    ).sync.round_config
    assert (ef.mode, ef.bits, ef.block_size, ef.error_feedback, ef.lr) == ("ef", 2, 32, False, 0.5)
    assert ef.design == "siq"
    pull = load_config(
        None,
        {"sync.mode": "ef", "sync.design": "pull", "sync.pull_every": 4, "sync.codec": "int8"},
        {},
    ).sync.round_config
    assert (pull.design, pull.pull_every, pull.codec) == ("pull", 4, "int8")
    diloco = load_config(
        None,
        {"sync.mode": "diloco", "sync.momentum_bits": 8, "sync.share_momentum": True},
        {},
    ).sync.round_config
    assert (diloco.bits, diloco.momentum_bits, diloco.share_momentum) == (16, 8, True)
    private = load_config(
        None, {"sync.mode": "diloco", "sync.share_momentum": False}, {}
    ).sync.round_config
    assert not private.share_momentum
    # ef-only keys leave the other modes' defaults alone.
    assert load_config(None, {"sync.codec": "int8"}, {}).sync.round_config == (
        default_round_config("noloco")
    )


def _run_flags(*args: str) -> dict[str, object]:
    return overrides_from_args(build_parser().parse_args(["run", *args]))


def test_run_flags_map_to_config_keys() -> None:
    flags = _run_flags(
        "--sync", "ef", "--bits", "8", "--codec", "int8", "--pairing", "hypercube", "--blocking"
    )  # fmt: skip
    assert flags == {
        "sync.mode": "ef",
        "sync.bits": 8,
        "sync.codec": "int8",
        "peers.pairing": "hypercube",
        "sync.overlap": False,
    }
    config = load_config(None, {**flags, "sync.design": "pull"}, {})
    assert config.sync.round_config.codec == "int8"
    assert config.sync.round_config.bits == 8
    assert config.peers.pairing == "hypercube"
    assert not config.sync.overlap


@pytest.mark.parametrize(
    "args",
    [
        ("--error-feedback", "ef14"),  # removed: the ef design keeps its own residual
        ("--bits", "3"),
        ("--pairing", "ring"),
        ("--codec", "zstd"),
    ],
)
def test_removed_or_malformed_run_flags_are_usage_errors(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", *args])
    assert info.value.code == 2
    capsys.readouterr()


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


def test_a_preset_sits_below_the_file_the_environment_and_the_flags(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("[protocol]\nkeepalive_s = 3.0\n")
    a = build_parser().parse_args(
        ["run", "--preset", "fast-failure-detection", "--config", str(toml),
         "--set", "peers.backoff_max_s=5"]
    )  # fmt: skip
    config = config_from_args(a, {"LOCOSWARM_PROTOCOL__PING_TIMEOUT_S": "4"})
    assert config.protocol.frame_timeout_s == 2.0  # the preset
    assert config.protocol.keepalive_s == 3.0  # the file over the preset
    assert config.protocol.ping_timeout_s == 4.0  # the environment over the preset
    assert config.peers.backoff_max_s == 5.0  # a flag over the preset
    assert config.sync.exchange_timeout_s == 8.0
    plain = config_from_args(build_parser().parse_args(["run"]), {})
    assert plain.protocol.frame_timeout_s != 2.0


def test_an_unknown_preset_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--preset", "fastest"])
    assert "fast-failure-detection" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="known: fast-failure-detection"):
        preset("fastest")
