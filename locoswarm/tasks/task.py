"""What is trained: a model, its batches and its loss, for one replica of a swarm.

The built-in default is a byte transformer on the Python standard library's sources (already on
every machine); users may pass their own text files or folders, a Hugging Face causal LM with its
tokenizer and data files (``hf``, see `locoswarm.tasks.hf`), or their own task as
``module:function``. Knows nothing about the network or the synchronisation algorithm.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from locoswarm.errors import ConfigError
from locoswarm.tasks import hf
from locoswarm.tasks.corpus import BatchStream, ByteCorpus, val_batches
from locoswarm.tasks.model import MODEL_SIZES, ByteTransformer, next_byte_loss

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskConfig:
    """Which task to train and on what data."""

    name: str = "tiny"
    """A built-in size (tiny, small, base), ``hf`` (a Hugging Face causal LM: task.model) or a
    plugin ``module:function``."""
    data: tuple[str, ...] = ()
    """Data files or folders: text for the built-in task (empty means the Python standard
    library); .json, .jsonl, .parquet or .txt for hf (required)."""
    batch_size: int = 8
    """Sequences per inner step and replica."""
    seq_len: int = 64
    """Bytes (tokens for hf) per sequence, at most the model's context."""
    val_batches: int = 16
    """Fixed validation batches evaluated per replica."""
    val_fraction: float = 0.02
    """Share of files (records for hf) held out for validation, chosen by a hash of their name."""
    max_bytes: int | None = None
    """Cap on training bytes per replica and on validation bytes (for quick runs; built-in
    task only)."""
    model: str = ""
    """hf: a folder with the model's config.json (and its weights unless from_scratch), or a
    hub-style name already in the local Hugging Face cache."""
    tokenizer: str = ""
    """hf: the tokenizer's folder (it needs an EOS token); empty means task.model's."""
    text_field: str = "text"
    """hf: the field of a json or parquet record that holds its text (a .txt file's records are
    its lines)."""
    from_scratch: bool = True
    """hf: draw the initial weights from the seed (every node alike); false loads the weights of
    task.model."""
    shuffle_windows: int = 512
    """hf: packed windows in each node's shuffle buffer (its batches are drawn from it; the buffer
    is saved in checkpoints)."""

    def __post_init__(self) -> None:
        builtin = self.name in MODEL_SIZES
        if ":" not in self.name and not builtin and self.name != hf.HF_TASK:
            raise ConfigError(
                f"task.name must be one of {sorted(MODEL_SIZES)}, {hf.HF_TASK!r} or "
                f"'module:function', got {self.name!r}"
            )
        if self.batch_size < 1 or self.seq_len < 1 or self.val_batches < 0:
            raise ConfigError("task.batch_size and seq_len must be >= 1, val_batches >= 0")
        if builtin and self.seq_len > MODEL_SIZES[self.name].seq_len:
            raise ConfigError(
                f"task.seq_len {self.seq_len} exceeds the {self.name} model's context "
                f"{MODEL_SIZES[self.name].seq_len}"
            )
        if self.name == hf.HF_TASK:
            hf.check_config(
                model=self.model,
                data=self.data,
                text_field=self.text_field,
                seq_len=self.seq_len,
                val_fraction=self.val_fraction,
                shuffle_windows=self.shuffle_windows,
            )
        elif self.model or self.tokenizer:
            raise ConfigError(f"task.model and task.tokenizer apply to --task {hf.HF_TASK} only")


@dataclass(kw_only=True, slots=True)
class ReplicaTask:
    """Everything one replica trains: its model, its endless batch iterator and the loss."""

    model: nn.Module
    batches: Iterator[Any]
    loss: LossFn
    val_batches: Sequence[Any] = field(default_factory=list)
    """Batches for validation loss; the same for every replica. Empty when the task has none."""
    info: dict[str, Any] = field(default_factory=dict)
    """Facts for reports (corpus sizes and the like)."""

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, device: torch.device | None = None) -> float:
        """Mean loss of ``model`` over the validation batches (NaN when the task has none);
        the model is left in eval mode (training sets train mode at each step)."""
        if not self.val_batches:
            return math.nan
        model.eval()
        total = 0.0
        for batch in self.val_batches:
            if device is not None:
                batch = _to_device(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_is_cuda(device)):
                total += float(self.loss(model, batch))
        return total / len(self.val_batches)


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def node_data_seed(peer_id: str) -> int:
    """The data seed of a node: its batches differ from every other node's, and a replay of the
    node (the simulator) draws the same ones."""
    return int(hashlib.sha256(peer_id.encode()).hexdigest()[:8], 16)


class TaskFactory:
    """Builds each replica's task; the plugin is imported and validation batches made once."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self._plugin = _load_plugin(cfg.name) if ":" in cfg.name else None
        self._val: list[Any] | None = None
        self._tokenizer: Any = None

    def build(self, *, replica: int, num_replicas: int, seed: int) -> ReplicaTask:
        """The task of replica ``replica`` of ``num_replicas``; batches seeded by ``seed``."""
        if self._plugin is not None:
            return _call_plugin(self._plugin, self.cfg.name, replica, num_replicas, seed)
        if self.cfg.name == hf.HF_TASK:
            return self._build_hf(replica, num_replicas, seed)
        cfg = self.cfg
        corpus = ByteCorpus.load(
            [Path(p) for p in cfg.data] if cfg.data else None,
            replica=replica,
            num_replicas=num_replicas,
            val_fraction=cfg.val_fraction,
            max_bytes=cfg.max_bytes,
        )
        if self._val is None and cfg.val_batches:
            self._val = val_batches(
                corpus.val,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                num_batches=cfg.val_batches,
            )
        stream = BatchStream(
            corpus.train,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=seed * 1_000_003 + replica,
        )
        return ReplicaTask(
            model=ByteTransformer(MODEL_SIZES[cfg.name]),
            batches=stream,
            loss=next_byte_loss,
            val_batches=self._val or [],
            info={
                "corpus_fingerprint": corpus.fingerprint,
                "train_files": corpus.num_train_files,
                "train_bytes": int(corpus.train.numel()),
                "val_files": corpus.num_val_files,
            },
        )

    def _build_hf(self, replica: int, num_replicas: int, seed: int) -> ReplicaTask:
        """A transformers causal LM (built first: from scratch it draws from torch's global
        generator, which the caller seeded) and its token stream (see `locoswarm.tasks.hf`)."""
        cfg = self.cfg
        model = hf.load_model(cfg.model, from_scratch=cfg.from_scratch)
        if self._tokenizer is None:
            self._tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
        hf.check_fit(model, self._tokenizer, cfg.seq_len)
        files = hf.list_data_files(cfg.data)
        if self._val is None and cfg.val_batches:
            self._val = hf.val_batches(
                files,
                self._tokenizer,
                text_field=cfg.text_field,
                val_fraction=cfg.val_fraction,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                num_batches=cfg.val_batches,
            )
        stream = hf.HfBatchStream(
            files,
            self._tokenizer,
            text_field=cfg.text_field,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=seed * 1_000_003 + replica,
            val_fraction=cfg.val_fraction,
            replica=replica,
            num_replicas=num_replicas,
            buffer_windows=cfg.shuffle_windows,
        )
        return ReplicaTask(
            model=model,
            batches=stream,
            loss=hf.causal_lm_loss,
            val_batches=self._val or [],
            info={
                "model": cfg.model,
                "model_class": type(model).__name__,
                "vocab_size": len(self._tokenizer),
                "data_fingerprint": hf.fingerprint(files),
                "train_files": len(files),
            },
        )


def _load_plugin(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"task {spec!r}: {module_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def _call_plugin(
    fn: Callable[..., Any], spec: str, replica: int, num_replicas: int, seed: int
) -> ReplicaTask:
    """Calls a user task ``fn(replica=, num_replicas=, seed=)``.

    It returns ``(model, batches, loss)`` or ``(model, batches, loss, val_batches)``, where
    ``batches`` is an iterable of batches and ``loss(model, batch)`` a scalar tensor.
    """
    parts = fn(replica=replica, num_replicas=num_replicas, seed=seed)
    if not isinstance(parts, tuple) or len(parts) not in (3, 4):
        raise ConfigError(
            f"task {spec!r} must return (model, batches, loss[, val_batches]), "
            f"got {type(parts).__name__}"
        )
    model, batches, loss = parts[:3]
    if not isinstance(model, nn.Module):
        raise ConfigError(f"task {spec!r}: model must be a torch.nn.Module, got {type(model)}")
    if not callable(loss):
        raise ConfigError(f"task {spec!r}: loss must be callable (model, batch) -> Tensor")
    val = list(parts[3]) if len(parts) == 4 else []
    return ReplicaTask(model=model, batches=iter(batches), loss=loss, val_batches=val)
