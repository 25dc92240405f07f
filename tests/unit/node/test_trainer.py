"""The trainer's validation: the outer weights' loss, measured without disturbing training."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator

import pytest
import torch

from locoswarm.node.trainer import Boundary, Trainer, flat_params
from locoswarm.tasks.inner import InnerConfig, set_flat
from locoswarm.tasks.task import TaskConfig, TaskFactory


def _trainer(eval_every: int) -> Trainer:
    torch.manual_seed(0)
    task = TaskFactory(TaskConfig(name="tiny", val_batches=2, max_bytes=100_000)).build(
        replica=0, num_replicas=1, seed=0
    )
    return Trainer(
        task,
        InnerConfig(),
        inner_steps=3,
        total_steps=None,
        device=torch.device("cpu"),
        tokens_per_step=1,
        eval_every=eval_every,
    )


def _run(trainer: Trainer, rounds: int) -> list[Boundary]:
    """Blocking rounds whose outer step moves phi a little away from theta."""
    stop = threading.Event()
    seen: list[Boundary] = []

    def on_boundary(b: Boundary) -> None:
        seen.append(b)
        trainer.deliver(b.outer_step, b.theta * 0.99, b.theta)
        if len(seen) == rounds:
            stop.set()

    trainer.run(
        first_outer_step=0,
        stop=stop,
        on_boundary=on_boundary,
        want_state=lambda r: False,
        overlap=False,
    )
    return seen


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bit-for-bit comparisons need one torch thread (a node runs with --threads 1 for replays:
    with several, the BLAS library may split work differently under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_validation_measures_the_outer_weights_and_leaves_training_unchanged() -> None:
    plain, measured = _trainer(0), _trainer(2)
    a, b = _run(plain, 5), _run(measured, 5)
    assert [x.val_loss for x in a] == [None] * 5
    assert [x.val_loss is not None for x in b] == [True, False, True, False, True]
    # Training is bit for bit what it is without validation.
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.theta, y.theta)
        assert x.loss == y.loss
    # The figure is the loss of the last phi received (round 3's), not of theta.
    model = copy.deepcopy(measured.model)
    set_flat(model, b[3].theta * 0.99)
    assert b[4].val_loss == measured.task.validation_loss(model)
    set_flat(model, b[4].theta)
    assert b[4].val_loss != measured.task.validation_loss(model)
    assert torch.equal(flat_params(measured.model), b[4].theta * 0.99)  # blocking: theta = phi
    assert measured.stats.eval_s > 0


def test_a_state_without_copies_is_the_copied_state_in_the_trainers_own_tensors() -> None:
    trainer = _trainer(0)
    _run(trainer, 2)  # the optimizer has state
    copied, shared = trainer.state_dict(), trainer.state_dict(copy_tensors=False)
    params = dict(trainer.model.state_dict())
    for name, t in shared["model"].items():
        assert t.data_ptr() == params[name].data_ptr(), name  # the model's own memory
        assert torch.equal(t, copied["model"][name])
        assert copied["model"][name].data_ptr() != t.data_ptr()
    moments = [
        (k, v)
        for state in shared["optimizer"]["state"].values()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.numel() > 1
    ]
    assert moments
    own = {v.data_ptr() for s in trainer.opt.state.values() for v in s.values()}
    for key, value in moments:
        assert value.data_ptr() in own, key
    assert shared["optimizer"]["param_groups"] == copied["optimizer"]["param_groups"]
    assert shared["step"] == copied["step"]
