"""``--task hf``: a Hugging Face causal language model trained on local files streamed by
``datasets``.

The model comes from a folder (``AutoConfig`` for a model trained from scratch, or
``AutoModelForCausalLM.from_pretrained``), the tokenizer from ``AutoTokenizer``, and the text from
``.json``, ``.jsonl``, ``.parquet`` or ``.txt`` files read one at a time with
``load_dataset(..., streaming=True)``. Texts are tokenized without special tokens, joined with the
tokenizer's EOS token between them and cut into ``seq_len``-token windows; the batch is
``{"input_ids": [batch_size, seq_len]}`` and the loss is the model's own causal LM loss (the model
shifts the labels, as in the ``run_clm`` examples).

How replicas split the data. A record is named by its file's key and its index in the file, and
every decision about it is a stable hash of that name, so nodes agree without talking and a file
present on only some machines moves no other record:

- validation records: the hash (salted for validation) falls below ``val_fraction``; the
  validation batches are the first ``val_batches`` batches of them in key order, the same on every
  node;
- replica shards (the simulator's ``num_replicas > 1``): a second salted hash modulo
  ``num_replicas``. A live swarm changes size all the time, so the daemon builds every node as
  replica 0 of 1: each node reads all training records, and its ``seed`` (from its peer id) makes
  its stream its own: it reads the files in an order permuted per epoch by the seed, and draws its
  batches from a shuffle buffer of packed windows with a generator seeded by it.

The position in the stream (epoch, file, record, leftover tokens, the shuffle buffer and its
generator) is `HfBatchStream.state_dict`, so a node restarted from its checkpoint continues with
the batch it would have drawn next. ``transformers`` and ``datasets`` are imported only when the
task is built. Knows nothing about the network, the sync algorithm or checkpoint files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import Tensor, nn

from locoswarm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HF_TASK: Final = "hf"
"""The ``task.name`` that selects this task."""

FORMATS: Final = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
"""File suffix -> ``datasets`` builder. A ``text`` file's records are its lines."""

INSTALL_HINT: Final = "pip install -e '.[hf]'"

_VAL_SALT = b"lsw-hf-val"
_SHARD_SALT = b"lsw-hf-shard"
_ORDER_SALT = b"lsw-hf-order"


@dataclass(frozen=True, slots=True)
class DataFile:
    """One data file: ``key`` names it in every hash (its path below its root, POSIX form)."""

    key: str
    path: Path
    builder: str
    """The ``datasets`` builder that reads it: json, parquet or text."""


def check_config(
    *,
    model: str,
    data: Sequence[str],
    text_field: str,
    seq_len: int,
    val_fraction: float,
    shuffle_windows: int,
) -> None:
    """The checks of ``TaskConfig`` for ``--task hf`` that need no file to be read.

    Raises:
        ConfigError: The hf libraries are missing, or a setting is missing or out of range.
    """
    missing = [m for m in ("transformers", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--task hf needs {' and '.join(missing)}: {INSTALL_HINT}")
    if not model:
        raise ConfigError(
            "--task hf needs task.model: a folder with the model's config.json (--model DIR)"
        )
    if _looks_local(model) and not Path(model).expanduser().exists():
        raise ConfigError(f"task.model: {model} does not exist")
    if not data:
        raise ConfigError(
            "--task hf needs task.data: files or folders of "
            f"{', '.join(sorted(FORMATS))} (--data PATH)"
        )
    if not text_field:
        raise ConfigError("task.text_field must not be empty")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"task.val_fraction must be in [0, 1), got {val_fraction}")
    if shuffle_windows < 1:
        raise ConfigError(f"task.shuffle_windows must be >= 1, got {shuffle_windows}")
    if seq_len < 2:
        raise ConfigError(f"--task hf needs task.seq_len >= 2 (a next token), got {seq_len}")


def _looks_local(name: str) -> bool:
    """A path rather than a hub-style ``org/name`` (resolved by transformers' local cache)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


# -- model and tokenizer ---------------------------------------------------------------------------


def load_model(path: str, *, from_scratch: bool) -> nn.Module:
    """The causal LM in fp32 (the daemon averages fp32 weights; CUDA training autocasts).

    From scratch, the weights are drawn from torch's global generator, so every node seeded
    alike starts from the same weights; otherwise they are the folder's.

    Raises:
        ConfigError: The folder holds no loadable model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if from_scratch:
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"task.model {path}: cannot load a causal LM: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"task.model {path}: not a torch model ({type(model).__name__})")
    return model


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path``; it must have an EOS token (the separator of packed texts).

    Raises:
        ConfigError: There is no tokenizer there, or it has no EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"task.tokenizer {path}: cannot load a tokenizer: {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"task.tokenizer {path}: the tokenizer has no EOS token")
    return tokenizer


def check_fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> None:
    """The tokenizer's ids fit the model's embedding and ``seq_len`` its context.

    Raises:
        ConfigError: They do not.
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}"
        )
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seq_len > context:
        raise ConfigError(f"task.seq_len {seq_len} exceeds the model's context {context}")


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's own next-token loss (it shifts the labels)."""
    ids = batch["input_ids"]
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    if not isinstance(loss, Tensor):
        raise ConfigError(f"{type(model).__name__} returned no loss: is it a causal LM?")
    return loss


def save_pretrained(model: nn.Module, tokenizer_path: str, out_dir: Path) -> None:
    """Writes the model (with its current weights) and the task's tokenizer with
    ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them."""
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise ConfigError(f"{type(model).__name__} has no save_pretrained")
    out_dir.mkdir(parents=True, exist_ok=True)
    save(str(out_dir))
    load_tokenizer(tokenizer_path).save_pretrained(str(out_dir))


# -- data files and records ----------------------------------------------------------------------


def list_data_files(paths: Sequence[str]) -> list[DataFile]:
    """The data files of ``paths`` (files, or folders searched recursively for the suffixes of
    `FORMATS`, skipping hidden entries), sorted by key. A key is the path below its root, with
    ``"<root index>/"`` in front when several roots are given.

    Raises:
        DataError: A path is missing, has an unknown suffix, or a folder holds no data file.
    """
    files: list[DataFile] = []
    for i, text in enumerate(paths):
        root = Path(text).expanduser()
        prefix = f"{i}/" if len(paths) > 1 else ""
        if root.is_file():
            builder = FORMATS.get(root.suffix.lower())
            if builder is None:
                raise DataError(f"{root}: not one of {', '.join(sorted(FORMATS))}")
            files.append(DataFile(prefix + root.name, root, builder))
        elif root.is_dir():
            found = [
                DataFile(prefix + p.relative_to(root).as_posix(), p, FORMATS[p.suffix.lower()])
                for p in _walk(root)
            ]
            if not found:
                raise DataError(f"{root} holds no {', '.join(sorted(FORMATS))} files")
            files.extend(found)
        else:
            raise DataError(f"data path {root} does not exist")
    return sorted(files, key=lambda f: f.key)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.suffix.lower() in FORMATS and path.is_file():
                yield path


def _hash64(text: str, salt: bytes) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big")


def is_validation(key: str, index: int, val_fraction: float) -> bool:
    """Whether record ``index`` of file ``key`` is held out for validation (every node agrees)."""
    return _hash64(f"{key}\0{index}", _VAL_SALT) < val_fraction * 2**64


def read_texts(file: DataFile, text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, text) of the records of ``file`` from index ``start`` on, streamed.

    Raises:
        DataError: A record has no string ``text_field``.
    """
    from datasets import load_dataset

    field = "text" if file.builder == "text" else text_field
    stream = load_dataset(file.builder, data_files=[str(file.path)], split="train", streaming=True)
    for index, record in itertools.islice(enumerate(stream), start, None):
        text = record.get(field)
        if not isinstance(text, str):
            raise DataError(f"{file.path}: record {index} has no text field {field!r}")
        yield index, text


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The text's tokens followed by EOS (the separator of packed texts)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return [*ids, int(tokenizer.eos_token_id)]


def val_batches(
    files: Sequence[DataFile],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str,
    val_fraction: float,
    batch_size: int,
    seq_len: int,
    num_batches: int,
) -> list[dict[str, Tensor]]:
    """The first ``num_batches`` batches of the validation records, packed in key order.

    Reads only as far as it needs. Fewer batches when the validation records hold fewer.

    Raises:
        DataError: The validation records fill not one batch.
    """
    wanted = batch_size * num_batches * seq_len
    tokens: list[int] = []
    for file in files:
        for index, text in read_texts(file, text_field):
            if is_validation(file.key, index, val_fraction):
                tokens += _tokens(tokenizer, text)
                if len(tokens) >= wanted:
                    break
        if len(tokens) >= wanted:
            break
    full = min(num_batches, len(tokens) // (batch_size * seq_len))
    if full == 0:
        raise DataError(
            f"the validation records (task.val_fraction {val_fraction}) hold {len(tokens)} "
            f"tokens, fewer than one batch of {batch_size} x {seq_len}: raise val_fraction "
            "or add data"
        )
    ids = torch.tensor(tokens[: full * batch_size * seq_len]).view(full, batch_size, seq_len)
    return [{"input_ids": ids[i]} for i in range(full)]


def fingerprint(files: Sequence[DataFile]) -> str:
    """Keys and sizes of the data files: a stream position is only valid for the same files."""
    h = hashlib.blake2b(digest_size=8)
    for file in files:
        h.update(f"{file.key}\0{file.path.stat().st_size}\n".encode())
    return h.hexdigest()


# -- the training stream -------------------------------------------------------------------------


class HfBatchStream:
    """An endless iterator of ``{"input_ids": [batch_size, seq_len]}`` int64 training batches.

    Records of this replica's shard that are not validation are read file by file (the file order
    permuted per epoch by ``seed``), tokenized and packed into windows. A window enters a shuffle
    buffer of ``buffer_windows``; each batch takes ``batch_size`` windows at random positions of
    the buffer (a private generator seeded by ``seed``) and refills them. Two streams over the
    same files with the same seed yield the same batches; `state_dict` captures the position.
    """

    def __init__(
        self,
        files: Sequence[DataFile],
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_field: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        val_fraction: float,
        replica: int = 0,
        num_replicas: int = 1,
        buffer_windows: int = 512,
    ) -> None:
        if not files:
            raise DataError("no data files")
        if num_replicas < 1 or not 0 <= replica < num_replicas:
            raise ConfigError(f"replica must satisfy 0 <= replica < {num_replicas}, got {replica}")
        self._files = list(files)
        self._tokenizer = tokenizer
        self._text_field = text_field
        self._batch_size = batch_size
        self._seq_len = seq_len
        self._seed = seed
        self._val_fraction = val_fraction
        self._replica = replica
        self._num_replicas = num_replicas
        self._capacity = max(buffer_windows, batch_size)
        self._fingerprint = fingerprint(self._files)
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch = 0
        self._file = 0  # position in this epoch's file order
        self._record = 0  # records of that file consumed (used or not)
        self._carry: list[int] = []
        self._buffer = torch.empty(0, seq_len, dtype=torch.int32)  # ids < 2**31; half the bytes
        self._texts: Iterator[tuple[int, str]] | None = None
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its file order)
        self._used_this_epoch = 0
        self._windows = 0  # windows packed so far: the buffer's fill plus batch_size per batch

    def __iter__(self) -> HfBatchStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if len(self._buffer) < self._capacity:
            fresh = [self._window() for _ in range(self._capacity - len(self._buffer))]
            self._buffer = torch.cat([self._buffer, torch.stack(fresh)])
        picks = torch.randperm(len(self._buffer), generator=self._gen)[: self._batch_size]
        batch = self._buffer[picks].long()
        for i in picks.tolist():
            self._buffer[i] = self._window()
        return {"input_ids": batch}

    def _current_file(self) -> DataFile:
        if self._order[0] != self._epoch:
            seed = _hash64(f"{self._seed}\0{self._epoch}", _ORDER_SALT) >> 1  # < 2**63
            gen = torch.Generator().manual_seed(seed)
            self._order = (self._epoch, torch.randperm(len(self._files), generator=gen).tolist())
        return self._files[self._order[1][self._file]]

    def _mine(self, key: str, index: int) -> bool:
        if is_validation(key, index, self._val_fraction):
            return False
        if self._num_replicas == 1:
            return True
        return _hash64(f"{key}\0{index}", _SHARD_SALT) % self._num_replicas == self._replica

    def _next_text(self) -> str:
        """The next text of this replica's stream, advancing file and epoch as files run out."""
        while True:
            file = self._current_file()
            if self._texts is None:
                self._texts = read_texts(file, self._text_field, self._record)
            for index, text in self._texts:
                self._record = index + 1
                if text and self._mine(file.key, index):
                    self._used_this_epoch += 1
                    return text
            self._texts, self._record = None, 0
            self._file += 1
            if self._file == len(self._files):
                if self._used_this_epoch == 0:
                    raise DataError(
                        f"replica {self._replica} of {self._num_replicas} has no training text "
                        f"in {len(self._files)} file(s) (val_fraction {self._val_fraction})"
                    )
                self._epoch, self._file, self._used_this_epoch = self._epoch + 1, 0, 0

    def _window(self) -> Tensor:
        while len(self._carry) < self._seq_len:
            self._carry += _tokens(self._tokenizer, self._next_text())
        window, self._carry = self._carry[: self._seq_len], self._carry[self._seq_len :]
        self._windows += 1
        return torch.tensor(window, dtype=torch.int32)

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, for checkpoints (tensors and plain values only)."""
        return {
            "files": self._fingerprint,
            "epoch": self._epoch,
            "file": self._file,
            "record": self._record,
            "used_this_epoch": self._used_this_epoch,
            "windows": self._windows,
            "carry": torch.tensor(self._carry, dtype=torch.int64),
            "buffer": self._buffer.clone(),
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, which must come from a stream over the same files and
        ``seq_len``.

        Raises:
            DataError: The data files or the window length differ from the saved stream's.
        """
        if state["files"] != self._fingerprint:
            raise DataError("the data files changed since the checkpoint: cannot resume its stream")
        buffer = state["buffer"]
        if buffer.dim() != 2 or buffer.shape[1] != self._seq_len:
            raise DataError(f"the checkpoint's stream has windows of {buffer.shape[-1]} tokens")
        self._epoch = int(state["epoch"])
        self._file = int(state["file"])
        self._record = int(state["record"])
        self._used_this_epoch = int(state["used_this_epoch"])
        self._windows = int(state["windows"])
        self._carry = [int(t) for t in state["carry"].tolist()]
        self._buffer = buffer.clone()
        self._gen.set_state(state["generator"])
        self._texts = None
