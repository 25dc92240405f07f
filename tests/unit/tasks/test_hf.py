"""``--task hf``: config errors, the model, its batches, the split between nodes, and resume.

The model folder, tokenizer and jsonl data are made on the spot (`tests.hf_fixtures`) and load
through the real ``from_pretrained`` and ``load_dataset`` paths.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from locoswarm.errors import ConfigError, DataError
from locoswarm.tasks import hf
from locoswarm.tasks.inner import InnerConfig, flat_params, set_flat
from locoswarm.tasks.task import ReplicaTask, TaskConfig, TaskFactory
from tests.hf_fixtures import VOCAB_SIZE, HfFiles, make_hf_files

pytest.importorskip("transformers", reason="--task hf needs the [hf] extra")
pytest.importorskip("datasets", reason="--task hf needs the [hf] extra")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> HfFiles:
    return make_hf_files(tmp_path_factory.mktemp("hf"))


def _config(files: HfFiles, **changes: Any) -> TaskConfig:
    fields: dict[str, Any] = {
        "name": "hf",
        "model": str(files.model),
        "data": (str(files.data),),
        "batch_size": 4,
        "seq_len": 32,
        "val_batches": 2,
        "val_fraction": 0.1,
        "shuffle_windows": 16,
    }
    return TaskConfig(**(fields | changes))


def _build(cfg: TaskConfig, seed: int = 0, **where: int) -> ReplicaTask:
    torch.manual_seed(0)  # the initial weights, as the daemon seeds them
    replica = {"replica": 0, "num_replicas": 1} | where
    return TaskFactory(cfg).build(seed=seed, **replica)


def _take(batches: Any, n: int) -> list[torch.Tensor]:
    return [next(batches)["input_ids"] for _ in range(n)]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "hf"}, "needs task.model"),
        ({"name": "hf", "model": "/nowhere/at/all"}, "/nowhere/at/all does not exist"),
        ({"name": "hf", "model": "."}, "needs task.data"),
        ({"name": "hf", "model": ".", "data": ("x",), "text_field": ""}, "text_field"),
        ({"name": "hf", "model": ".", "data": ("x",), "val_fraction": 1.0}, "val_fraction"),
        ({"name": "hf", "model": ".", "data": ("x",), "seq_len": 1}, "seq_len >= 2"),
        ({"name": "tiny", "model": "."}, "apply to --task hf only"),
        ({"name": "gpt"}, "'hf'"),
        ({"name": "tiny", "seq_len": 100_000}, "exceeds the tiny model's context"),
    ],
)
def test_config_errors_name_the_setting(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TaskConfig(**fields)


def test_seq_len_is_checked_against_built_in_sizes_only() -> None:
    assert TaskConfig(name="hf", model=".", data=("x",), seq_len=100_000).seq_len == 100_000


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=re.escape("pip install -e '.[hf]'")):
        TaskConfig(name="hf", model=".", data=("x",))


def test_build_errors_name_the_path(files: HfFiles, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _build(_config(files, data=(str(tmp_path / "missing"),)))
    (tmp_path / "notes.md").write_text("# not a data file\n")
    with pytest.raises(DataError, match="holds no"):
        _build(_config(files, data=(str(tmp_path),)))
    with pytest.raises(DataError, match=r"notes\.md"):
        _build(_config(files, data=(str(tmp_path / "notes.md"),)))
    with pytest.raises(ConfigError, match="cannot load a causal LM"):
        _build(_config(files, model=str(tmp_path)))
    with pytest.raises(ConfigError, match="exceeds the model's context 128"):
        _build(_config(files, seq_len=129))
    with pytest.raises(DataError, match="raise val_fraction"):
        _build(_config(files, val_fraction=0.0))


def test_a_record_without_the_text_field_is_named(files: HfFiles, tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    task = _build(_config(files, data=(str(tmp_path),), val_batches=0))
    with pytest.raises(DataError, match=r"d\.jsonl: record 0 has no text field 'text'"):
        next(task.batches)


# -- model, batches and loss ---------------------------------------------------------------------


def test_task_builds_batches_of_tokens(files: HfFiles) -> None:
    task = _build(_config(files))
    assert type(task.model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in task.model.parameters())
    batch = next(task.batches)
    assert set(batch) == {"input_ids"}
    ids = batch["input_ids"]
    assert ids.shape == (4, 32)
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 0
    assert int(ids.max()) < VOCAB_SIZE
    assert len(task.val_batches) == 2
    assert all(b["input_ids"].shape == (4, 32) for b in task.val_batches)
    assert task.info["model_class"] == "LlamaForCausalLM"
    assert task.info["train_files"] == 3


def test_texts_are_packed_with_eos_between_them(files: HfFiles, tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "ab"}) + "\n" for _ in range(50)))
    task = _build(_config(files, data=(str(tmp_path),), val_batches=0, batch_size=1, seq_len=8))
    tokenizer = hf.load_tokenizer(str(files.model))
    text = tokenizer.decode(next(task.batches)["input_ids"][0])
    assert isinstance(text, str)
    assert text in "ab<|endoftext|>" * 20
    assert "ab<|endoftext|>ab" in text


def test_loss_is_finite_and_falls_on_one_batch(files: HfFiles) -> None:
    task = _build(_config(files))
    batch = next(task.batches)
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = task.loss(task.model, batch)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(torch.log(torch.tensor(VOCAB_SIZE)).item(), abs=0.5)
    assert losses[-1] < losses[0] - 0.3, losses
    assert task.validation_loss(task.model) == pytest.approx(
        sum(float(task.loss(task.model, b).detach()) for b in task.val_batches) / 2, rel=1e-5
    )


# -- the split between nodes ---------------------------------------------------------------------


def test_nodes_draw_their_own_batches_and_share_validation(files: HfFiles) -> None:
    cfg = _config(files)
    a, b = _build(cfg, seed=1), _build(cfg, seed=2)  # separate factories: separate val reads
    again = _build(cfg, seed=1)
    first_a = _take(a.batches, 3)
    assert all(torch.equal(x, y) for x, y in zip(first_a, _take(again.batches, 3), strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(first_a, _take(b.batches, 3), strict=True))
    assert len(a.val_batches) == len(b.val_batches) == 2
    for u, v in zip(a.val_batches, b.val_batches, strict=True):
        assert torch.equal(u["input_ids"], v["input_ids"])


def _numbered_records(tmp_path: Path, count: int) -> Path:
    """Records ``<i>`` that can be told apart after tokenizing, packing and decoding."""
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps({"text": f"<{i}>"}) + "\n" for i in range(count)))
    return path


def _records_read(task: ReplicaTask, tokenizer: Any, windows: int) -> list[int]:
    """The record numbers of the first ``windows`` windows (a buffer of one keeps their order)."""
    text = "".join(tokenizer.decode(next(task.batches)["input_ids"][0]) for _ in range(windows))
    return [int(n) for n in re.findall(r"<(\d+)>", text)]


def test_validation_records_never_train_and_shards_are_disjoint(
    files: HfFiles, tmp_path: Path
) -> None:
    count, fraction = 120, 0.25
    data = _numbered_records(tmp_path, count)
    val = {i for i in range(count) if hf.is_validation("numbered.jsonl", i, fraction)}
    assert 0 < len(val) < count
    cfg = _config(
        files,
        data=(str(data),),
        val_fraction=fraction,
        batch_size=1,
        seq_len=16,
        val_batches=1,
        shuffle_windows=1,
    )
    tokenizer = hf.load_tokenizer(str(files.model))
    shards = []
    for replica in range(2):
        task = _build(cfg, replica=replica, num_replicas=2)
        read = _records_read(task, tokenizer, windows=80)  # more than one epoch
        assert not set(read) & val
        shards.append(set(read))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(count)) - val
    whole = _records_read(_build(cfg), tokenizer, windows=80)
    assert set(whole) == set(range(count)) - val  # one node of a live swarm reads every record


# -- resume --------------------------------------------------------------------------------------


def _saved(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` after the checkpoint's round trip (torch.save, weights-only load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize("taken", [0, 3, 40])
def test_a_restored_stream_continues_with_the_next_batch(files: HfFiles, taken: int) -> None:
    cfg = _config(files, seq_len=64)
    original = _build(cfg, seed=7).batches
    _take(original, taken)
    state = _saved(original.state_dict())  # type: ignore[attr-defined]
    expected = _take(original, 5)
    fresh = _build(cfg, seed=7).batches
    fresh.load_state_dict(state)  # type: ignore[attr-defined]
    got = _take(fresh, 5)
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
    other = _build(cfg, seed=7).batches  # without the state it starts over (the test can fail)
    assert taken == 0 or not torch.equal(_take(other, 1)[0], expected[0])


def test_resume_across_an_epoch_and_refuse_other_files(files: HfFiles, tmp_path: Path) -> None:
    data = _numbered_records(tmp_path, 40)
    cfg = _config(files, data=(str(data),), val_batches=0, batch_size=2, seq_len=8)
    stream = _build(cfg).batches
    _take(stream, 30)
    state = _saved(stream.state_dict())  # type: ignore[attr-defined]
    assert state["epoch"] >= 1
    expected = _take(stream, 3)
    fresh = _build(cfg).batches
    fresh.load_state_dict(state)  # type: ignore[attr-defined]
    assert all(torch.equal(x, y) for x, y in zip(expected, _take(fresh, 3), strict=True))
    data.write_text(data.read_text() + json.dumps({"text": "more"}) + "\n")
    with pytest.raises(DataError, match="data files changed"):
        _build(cfg).batches.load_state_dict(state)  # type: ignore[attr-defined]


def test_the_trainer_checkpoints_the_data_position(files: HfFiles) -> None:
    from locoswarm.node.trainer import Trainer

    def trainer() -> Trainer:
        return Trainer(
            _build(_config(files), seed=3),
            InnerConfig(warmup_steps=0),
            inner_steps=2,
            total_steps=None,
            device=torch.device("cpu"),
            tokens_per_step=4 * 32,
        )

    first = trainer()
    for _ in range(3):
        first.inner_step()
    state = _saved(first.state_dict())
    assert state["data"]["windows"] == 16 + 4 * 3  # the buffer's fill, then a batch per step
    second = trainer()
    second.load_state_dict(state)
    assert torch.equal(
        next(first.task.batches)["input_ids"], next(second.task.batches)["input_ids"]
    )


# -- weights -------------------------------------------------------------------------------------


def test_from_scratch_follows_the_seed_and_from_pretrained_loads_weights(
    files: HfFiles, tmp_path: Path
) -> None:
    cfg = _config(files)
    a, b = _build(cfg).model, _build(cfg).model
    assert torch.equal(flat_params(a), flat_params(b))
    torch.manual_seed(1)
    c = TaskFactory(cfg).build(replica=0, num_replicas=1, seed=0).model
    assert not torch.equal(flat_params(a), flat_params(c))

    saved = tmp_path / "pretrained"
    shutil.copytree(files.model, saved)
    set_flat(c, flat_params(c) * 0.5)  # weights no seed draws
    c.save_pretrained(saved)  # type: ignore[operator]
    loaded = _build(_config(files, model=str(saved), from_scratch=False)).model
    assert torch.equal(flat_params(loaded), flat_params(c))
    assert not torch.equal(flat_params(loaded), flat_params(a))


def test_tied_embeddings_stay_tied_through_flat_weights(tmp_path: Path) -> None:
    tied = make_hf_files(tmp_path, tie_word_embeddings=True)
    model = _build(_config(tied)).model
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight  # type: ignore[union-attr]
    assert head is embed
    flat = flat_params(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    assert flat.numel() < sum(p.numel() for p in model.state_dict().values())  # counted once
    set_flat(model, flat + 1.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    assert torch.equal(flat_params(model), flat + 1.0)


def test_save_pretrained_writes_a_loadable_folder(files: HfFiles, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = _build(_config(files))
    out = tmp_path / "export"
    hf.save_pretrained(task.model, str(files.model), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(flat_params(model), flat_params(task.model))
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    assert task.validation_loss(model) == pytest.approx(task.validation_loss(task.model))
