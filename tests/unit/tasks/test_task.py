"""Task selection: the built-in default, user data paths and module:function plugins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locoswarm.errors import ConfigError, DataError
from locoswarm.tasks.task import TaskConfig, TaskFactory


def test_default_task_builds_a_replica_with_disjoint_data() -> None:
    factory = TaskFactory(TaskConfig(name="tiny", val_batches=2, max_bytes=100_000))
    a = factory.build(replica=0, num_replicas=2, seed=0)
    b = factory.build(replica=1, num_replicas=2, seed=0)
    assert a.info["train_files"] > 0
    assert b.info["train_files"] > 0
    xa, _ = next(a.batches)
    xb, _ = next(b.batches)
    assert xa.shape == (8, 64)
    assert not torch.equal(xa, xb)
    # Validation is shared by every replica.
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a.val_batches, b.val_batches, strict=True))
    assert torch.isfinite(a.loss(a.model, (xa, xa)))


def test_user_text_folder(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 200)
    factory = TaskFactory(
        TaskConfig(name="tiny", data=(str(tmp_path),), val_batches=1, batch_size=2, seq_len=16)
    )
    task = factory.build(replica=0, num_replicas=1, seed=1)
    x, y = next(task.batches)
    assert x.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_missing_data_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    factory = TaskFactory(TaskConfig(name="tiny", data=(str(missing),)))
    with pytest.raises(DataError, match="nowhere"):
        factory.build(replica=0, num_replicas=1, seed=0)


def test_empty_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    factory = TaskFactory(TaskConfig(name="tiny", data=(str(tmp_path),)))
    with pytest.raises(DataError, match="no text files"):
        factory.build(replica=0, num_replicas=1, seed=0)


def test_plugin_task() -> None:
    factory = TaskFactory(TaskConfig(name="tests.unit.tasks.sample_plugin:make"))
    task = factory.build(replica=1, num_replicas=2, seed=3)
    assert isinstance(task.model, torch.nn.Linear)
    assert len(task.val_batches) == 1
    loss = task.loss(task.model, next(task.batches))
    assert loss.ndim == 0


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("nosuchmodule_xyz:make", "cannot import module"),
        ("tests.unit.tasks.sample_plugin:missing", "no callable"),
        ("tests.unit.tasks.sample_plugin:not_a_task", "must return"),
        (":make", "module:function"),
    ],
)
def test_bad_plugins_are_clear_errors(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TaskFactory(TaskConfig(name=name)).build(replica=0, num_replicas=1, seed=0)


def test_task_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"task\.name"):
        TaskConfig(name="huge")
    with pytest.raises(ConfigError, match="exceeds"):
        TaskConfig(name="tiny", seq_len=4096)
