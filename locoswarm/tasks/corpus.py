"""Byte-level (vocab 256) corpus for the built-in default task: list, split, shard, read, batch.

The default corpus is the running interpreter's standard library ``*.py`` sources, present on
every machine. The validation split and replica shards are per-file decisions from a stable hash
of each file's key, so replicas agree without talking. This module does not know about models,
devices, the network or the sync algorithm, and it cannot tell whether peers hold the same corpus
(a different Python version has a different stdlib): compare `ByteCorpus.fingerprint` for that.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from locoswarm.errors import ConfigError, DataError

CorpusFile = tuple[str, Path]
"""A corpus file: (key, path). The key is a POSIX path relative to its root, unique in a corpus."""

SEPARATOR = b"\n\n"
"""Bytes appended after each file by `load_bytes`."""

SINGLE_FILE_VAL_FRACTION = 0.05
"""With a single corpus file, the last 5% of its bytes is the validation set."""

_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_MACHINE_SPECIFIC = ("_sysconfigdata", "config-")  # stdlib entries that embed build paths
_SNIFF_BYTES = 8192
_VAL_SALT = b"locoswarm-val"
_SHARD_SALT = b"locoswarm-shard"


def stdlib_root() -> Path:
    """Returns the standard library directory of the running interpreter (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_text(path: Path) -> bool:
    """Whether `path` is non-empty and has no NUL byte in its first 8 KiB."""
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e}") from e
    return bool(head) and b"\0" not in head


def _walk(root: Path, suffix: str) -> Iterator[Path]:
    """Yields regular files named ``*<suffix>`` under `root`, pruning hidden and skipped dirs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and name.endswith(suffix) and path.is_file():
                yield path


def list_corpus_files(paths: Sequence[str | Path] | None) -> list[CorpusFile]:
    """Lists a corpus's text files as (key, path) pairs sorted by key.

    A folder in `paths` contributes every regular file under it, skipping hidden entries,
    ``__pycache__``, ``site-packages``, ``dist-packages``, empty files and files with a NUL byte
    in their first 8 KiB. ``None`` means the default corpus: every ``*.py`` file under
    `stdlib_root()` by the same rules, less the machine-specific ``_sysconfigdata*`` and
    ``config-*`` entries. A key is the path relative to its root in POSIX form (a file root's own
    name), prefixed with ``"<root index>/"`` when several roots are given.

    Raises:
        DataError: A path does not exist, or yields no non-empty text file.
    """
    roots, suffix = ([stdlib_root()], ".py") if paths is None else ([Path(p) for p in paths], "")
    if not roots:
        raise DataError("no data paths given")
    files: list[CorpusFile] = []
    for i, root in enumerate(roots):
        if not root.exists():
            raise DataError(f"data path {root} does not exist")
        prefix = f"{i}/" if len(roots) > 1 else ""
        if root.is_dir():
            found = [(prefix + p.relative_to(root).as_posix(), p) for p in _walk(root, suffix)]
            if paths is None:
                found = [f for f in found if not f[0].startswith(_MACHINE_SPECIFIC)]
        elif root.is_file():
            found = [(prefix + root.name, root)]
        else:
            raise DataError(f"data path {root} is neither a regular file nor a folder")
        found = [(key, path) for key, path in found if _is_text(path)]
        if not found:
            raise DataError(f"data path {root} contains no text files (empty or binary)")
        files.extend(found)
    files.sort(key=lambda f: f[0])
    return files


def _bucket(key: str, salt: bytes) -> int:
    """A stable 64-bit hash of `key` (never Python's salted ``hash()``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big")


def split_files(
    files: Sequence[CorpusFile], *, val_fraction: float = 0.02, min_val_files: int = 1
) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Splits files into (train, val) by a stable hash of each key; both keep the input order.

    A file is validation when its hash, as a fraction of 2**64, is below `val_fraction`. With two
    or more files, the split holds at least `min_val_files` validation files and at least one
    train file, topping up or trimming in hash order. A single file cannot be split by file: it
    is returned as train with no validation files (`ByteCorpus.load` then splits its bytes).

    Raises:
        ConfigError: `val_fraction` is outside [0, 1) or `min_val_files` is negative.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_files < 0:
        raise ConfigError(f"min_val_files must be >= 0, got {min_val_files}")
    if len(files) < 2:
        return list(files), []
    buckets = {key: _bucket(key, _VAL_SALT) for key, _ in files}
    num_val = sum(1 for b in buckets.values() if b < val_fraction * 2**64)
    num_val = min(max(num_val, min_val_files), len(files) - 1)
    val_keys = set(sorted(buckets, key=lambda k: (buckets[k], k))[:num_val])
    train = [f for f in files if f[0] not in val_keys]
    return train, [f for f in files if f[0] in val_keys]


def _check_replica(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"replica index must satisfy 0 <= index < count, got {index} of {count}")


def shard_files(files: Sequence[CorpusFile], index: int, count: int) -> list[CorpusFile]:
    """Returns replica `index`'s share of `files`: those whose key hash mod `count` is `index`.

    The hash is stable and salted apart from the validation split's, and each file's shard depends
    on its key alone, so shards are disjoint, cover all files, are alike in content (not ranges
    of sorted keys), and a file present on only some machines moves no other file.

    Raises:
        ConfigError: Not ``0 <= index < count``.
        DataError: This replica's shard is empty (too few files for `count` replicas).
    """
    _check_replica(index, count)
    shard = [f for f in files if _bucket(f[0], _SHARD_SALT) % count == index]
    if not shard:
        raise DataError(
            f"replica {index} of {count} gets no training files ({len(files)} files in all); "
            "add files or use fewer replicas"
        )
    return shard


def load_bytes(files: Sequence[CorpusFile], *, max_bytes: int | None = None) -> Tensor:
    """Concatenates the files, in order, each followed by `SEPARATOR`, into a 1-D uint8 tensor.

    `max_bytes`, if set, truncates the result to its first `max_bytes` bytes; files past the cap
    are not read.

    Raises:
        DataError: A file cannot be read.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ConfigError(f"max_bytes must be >= 0, got {max_bytes}")
    buf = bytearray()
    for _, path in files:
        if max_bytes is not None and len(buf) >= max_bytes:
            break
        try:
            buf += path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read corpus file {path}: {e}") from e
        buf += SEPARATOR
    if max_bytes is not None:
        del buf[max_bytes:]
    if not buf:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def _fingerprint(files: Sequence[CorpusFile]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for key, path in files:
        h.update(f"{key}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True, eq=False, slots=True)
class ByteCorpus:
    """One replica's view of a byte corpus: its train shard and the shared validation bytes."""

    train: Tensor
    """This replica's training bytes (1-D uint8), disjoint from every other replica's."""
    val: Tensor
    """Validation bytes (1-D uint8), identical on every replica."""
    num_files: int
    """Files in the whole corpus."""
    num_train_files: int
    """Files in this replica's train shard."""
    num_val_files: int
    """Files in the validation split (0 when a single file's bytes were split)."""
    fingerprint: str
    """Hash of all keys and file sizes; replicas must agree on it for the split to be shared."""

    @classmethod
    def load(
        cls,
        paths: Sequence[str | Path] | None,
        *,
        replica: int = 0,
        num_replicas: int = 1,
        val_fraction: float = 0.02,
        max_bytes: int | None = None,
    ) -> ByteCorpus:
        """Lists, splits, shards and reads a corpus (see `list_corpus_files` for `paths`).

        With several files the split is by file (`split_files`, `shard_files`). With exactly one
        file, its last `SINGLE_FILE_VAL_FRACTION` of bytes is validation and the rest is cut into
        `num_replicas` equal contiguous chunks (up to ``num_replicas - 1`` bytes go unused).
        `max_bytes`, if set, caps this replica's train bytes and the val bytes separately.

        Raises:
            DataError: The corpus is missing, empty, unreadable or too small to split or shard.
            ConfigError: An argument is out of range.
        """
        files = list_corpus_files(paths)
        if len(files) > 1:
            train_files, val_files = split_files(files, val_fraction=val_fraction)
            shard = shard_files(train_files, replica, num_replicas)
            train = load_bytes(shard, max_bytes=max_bytes)
            val = load_bytes(val_files, max_bytes=max_bytes)
            num_train, num_val = len(shard), len(val_files)
        else:
            _check_replica(replica, num_replicas)
            data = load_bytes(files)
            num_val_bytes = max(1, int(len(data) * SINGLE_FILE_VAL_FRACTION))
            chunk = (len(data) - num_val_bytes) // num_replicas
            if chunk == 0:
                raise DataError(f"{files[0][1]} is too small to split over {num_replicas} replicas")
            train = data[replica * chunk : (replica + 1) * chunk][:max_bytes]
            val = data[len(data) - num_val_bytes :][:max_bytes]
            num_train, num_val = 1, 0
        return cls(
            train=train,
            val=val,
            num_files=len(files),
            num_train_files=num_train,
            num_val_files=num_val,
            fingerprint=_fingerprint(files),
        )


def _check_window(data: Tensor, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if data.dim() != 1 or data.numel() < seq_len + 1:
        raise DataError(
            f"data holds {data.numel()} bytes, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; add data, raise max_bytes or lower seq_len"
        )


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len)
    return data[idx].long(), data[idx + 1].long()


class BatchStream:
    """An endless iterator of (x, y) int64 batches of shape [batch_size, seq_len], y = x + 1 byte.

    Window starts are drawn uniformly with a private `torch.Generator` seeded by `seed`, so two
    streams with the same data and seed yield identical batches and the global RNG is untouched.
    """

    def __init__(self, data: Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        _check_window(data, batch_size, seq_len)
        self._data = data
        self._batch_size = batch_size
        self._seq_len = seq_len
        self._gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The position in the stream (the sampler's generator state), for checkpoints."""
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._gen.set_state(state["generator"])

    def __next__(self) -> tuple[Tensor, Tensor]:
        high = self._data.numel() - self._seq_len
        starts = torch.randint(0, high, (self._batch_size,), generator=self._gen)
        return _windows(self._data, starts, self._seq_len)


def val_batches(
    data: Tensor, *, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Returns `num_batches` (x, y) batches of evenly spaced windows over `data`; no randomness.

    The same data gives the same batches on every replica and run, so losses are comparable.
    """
    _check_window(data, batch_size, seq_len)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be >= 1, got {num_batches}")
    num_windows = batch_size * num_batches
    last = data.numel() - seq_len - 1
    starts = torch.arange(num_windows) * last // max(num_windows - 1, 1)
    x, y = _windows(data, starts, seq_len)
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_windows, batch_size)
    ]
