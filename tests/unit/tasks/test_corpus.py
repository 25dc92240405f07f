"""Tests for the byte-level corpus: listing, split, shards, reading and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locoswarm.errors import ConfigError, DataError
from locoswarm.tasks.corpus import (
    SEPARATOR,
    BatchStream,
    ByteCorpus,
    CorpusFile,
    list_corpus_files,
    load_bytes,
    shard_files,
    split_files,
    stdlib_root,
    val_batches,
)


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _text_tree(root: Path, num_files: int = 40, size: int = 300) -> Path:
    return _write(
        root, {f"d{i % 3}/f{i:03d}.txt": bytes([65 + i % 26]) * size for i in range(num_files)}
    )


def _keys(files: list[CorpusFile]) -> list[str]:
    return [key for key, _ in files]


# --- listing -----------------------------------------------------------------------------------


def test_missing_path_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        list_corpus_files([missing])


def test_empty_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no text files"):
        list_corpus_files([tmp_path / "empty"])


def test_only_empty_files_raises(tmp_path: Path) -> None:
    root = _write(tmp_path / "c", {"a.txt": b"", "sub/b.txt": b""})
    with pytest.raises(DataError, match="contains no text files"):
        list_corpus_files([root])


def test_skips_binary_hidden_and_pycache(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "c",
        {
            "a.txt": b"hello",
            "sub/b.py": b"print(1)",
            "blob.bin": b"ab\x00cd",
            ".hidden": b"secret",
            ".git/config": b"x",
            "__pycache__/m.pyc": b"pyc",
            "site-packages/pkg.py": b"pkg",
            "empty.txt": b"",
        },
    )
    assert _keys(list_corpus_files([root])) == ["a.txt", "sub/b.py"]


def test_keys_sorted_and_prefixed_for_several_roots(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", {"z.txt": b"z", "a/b.txt": b"b"})
    single = _write(tmp_path / "two", {"big.txt": b"big"}) / "big.txt"
    assert _keys(list_corpus_files([one])) == ["a/b.txt", "z.txt"]
    assert _keys(list_corpus_files([str(single)])) == ["big.txt"]
    assert _keys(list_corpus_files([one, single, one])) == [
        "0/a/b.txt",
        "0/z.txt",
        "1/big.txt",
        "2/a/b.txt",
        "2/z.txt",
    ]


def test_binary_single_file_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x.bin": b"\x00\x01"}) / "x.bin"
    with pytest.raises(DataError, match=r"x\.bin"):
        list_corpus_files([path])


# --- split and shards --------------------------------------------------------------------------


def test_split_is_stable_disjoint_and_guarantees_both_sides(tmp_path: Path) -> None:
    files = list_corpus_files([_text_tree(tmp_path, num_files=40)])
    train, val = split_files(files)
    assert (train, val) == split_files(list(files))
    assert len(val) >= 1
    assert sorted(_keys(train) + _keys(val)) == _keys(files)
    assert set(_keys(train)).isdisjoint(_keys(val))
    two = files[:2]
    assert [len(part) for part in split_files(two, val_fraction=0.9)] == [1, 1]
    assert [len(part) for part in split_files(files, min_val_files=5)] == [35, 5]
    assert split_files(files[:1]) == (files[:1], [])
    with pytest.raises(ConfigError):
        split_files(files, val_fraction=1.0)


def test_shards_disjoint_and_covering(tmp_path: Path) -> None:
    files = list_corpus_files([_text_tree(tmp_path, num_files=40)])
    shards = [shard_files(files, i, 3) for i in range(3)]
    assert sorted(k for shard in shards for k in _keys(shard)) == _keys(files)
    assert sum(len(s) for s in shards) == len(files)
    assert shards[1] == shard_files(files, 1, 3)
    with pytest.raises(ConfigError):
        shard_files(files, 3, 3)
    errors = []
    for i in range(2):  # one file over two replicas: exactly one shard is empty
        try:
            assert shard_files(files[:1], i, 2) == files[:1]
        except DataError as e:
            errors.append(str(e))
    assert len(errors) == 1
    assert "fewer replicas" in errors[0]


# --- reading -----------------------------------------------------------------------------------


def test_load_bytes_concatenates_and_caps(tmp_path: Path) -> None:
    files = list_corpus_files([_write(tmp_path, {"a": b"abc", "b": b"de"})])
    data = load_bytes(files)
    assert data.dtype == torch.uint8
    assert bytes(data.tolist()) == b"abc" + SEPARATOR + b"de" + SEPARATOR
    assert bytes(load_bytes(files, max_bytes=4).tolist()) == b"abc\n"
    assert load_bytes([]).numel() == 0


def test_load_bytes_unreadable_raises_naming_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone"):
        load_bytes([("gone", tmp_path / "gone")])


def test_corpus_val_shared_and_train_disjoint(tmp_path: Path) -> None:
    root = _write(tmp_path, {f"f{i:02d}.txt": f"file {i};".encode() * 20 for i in range(30)})
    corpora = [ByteCorpus.load([root], replica=i, num_replicas=3) for i in range(3)]
    assert all(torch.equal(c.val, corpora[0].val) for c in corpora)
    assert len({c.fingerprint for c in corpora}) == 1
    assert corpora[0].num_files == 30
    assert sum(c.num_train_files for c in corpora) + corpora[0].num_val_files == 30
    texts = [bytes(c.train.tolist()) for c in corpora] + [bytes(corpora[0].val.tolist())]
    for i in range(30):  # every file lands in exactly one train shard or in val
        assert sum(f"file {i};".encode() * 20 in text for text in texts) == 1


def test_corpus_max_bytes_caps_train_and_val(tmp_path: Path) -> None:
    root = _text_tree(tmp_path, num_files=40, size=1000)
    corpus = ByteCorpus.load([root], num_replicas=2, max_bytes=500)
    assert corpus.train.numel() == 500
    assert corpus.val.numel() == 500


def test_single_file_splits_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path, {"book.txt": bytes(range(32, 127)) * 100}) / "book.txt"
    whole = load_bytes(list_corpus_files([path]))
    parts = [ByteCorpus.load([path], replica=i, num_replicas=2) for i in range(2)]
    num_val = int(whole.numel() * 0.05)
    assert torch.equal(parts[0].val, whole[-num_val:])
    assert torch.equal(parts[1].val, parts[0].val)
    train = torch.cat([parts[0].train, parts[1].train])
    assert parts[0].train.numel() == parts[1].train.numel()
    assert torch.equal(train, whole[: train.numel()])
    assert whole.numel() - num_val - train.numel() < 2  # at most num_replicas - 1 bytes unused
    assert parts[0].num_val_files == 0


# --- batches -----------------------------------------------------------------------------------


def test_batch_stream_deterministic_shifted_and_private_rng() -> None:
    data = torch.randint(
        0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    a = BatchStream(data, batch_size=4, seq_len=16, seed=7)
    b = BatchStream(data, batch_size=4, seq_len=16, seed=7)
    c = BatchStream(data, batch_size=4, seq_len=16, seed=8)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == ya.shape == (4, 16)
        assert xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    assert torch.equal(torch.rand(3), expected_global)
    ramp = torch.arange(300, dtype=torch.int64).to(torch.uint8)
    x, y = next(BatchStream(ramp, batch_size=8, seq_len=32, seed=1))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 256, y)


def test_too_short_data_raises() -> None:
    with pytest.raises(DataError, match="window"):
        BatchStream(torch.zeros(16, dtype=torch.uint8), batch_size=1, seq_len=16, seed=0)
    with pytest.raises(DataError, match="window"):
        val_batches(torch.zeros(3, dtype=torch.uint8), batch_size=1, seq_len=8, num_batches=1)
    BatchStream(torch.zeros(17, dtype=torch.uint8), batch_size=1, seq_len=16, seed=0)


def test_val_batches_fixed_and_evenly_spaced() -> None:
    ramp = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    first = val_batches(ramp, batch_size=2, seq_len=10, num_batches=3)
    again = val_batches(ramp, batch_size=2, seq_len=10, num_batches=3)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert x.shape == y.shape == (2, 10)
        assert torch.equal(x, x2)
        assert torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    starts = [int(x[r, 0]) for x, _ in first for r in range(2)]
    assert starts == [s % 256 for s in (0, 197, 395, 593, 791, 989)]


# --- the real default corpus (the running interpreter's stdlib) ---------------------------------


@pytest.fixture(scope="module")
def stdlib_files() -> list[CorpusFile]:
    return list_corpus_files(None)


def test_default_corpus_split_and_shards(stdlib_files: list[CorpusFile]) -> None:
    keys = _keys(stdlib_files)
    assert len(keys) > 100
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert all(path.suffix == ".py" for _, path in stdlib_files)
    assert not any("site-packages" in k or "__pycache__" in k for k in keys)
    assert all(path.is_relative_to(stdlib_root()) for _, path in stdlib_files)
    train, val = split_files(stdlib_files)
    assert val
    assert set(_keys(train)).isdisjoint(_keys(val))
    assert len(train) + len(val) == len(keys)
    shards = [shard_files(train, i, 4) for i in range(4)]
    shard_keys = [set(_keys(shard)) for shard in shards]
    assert sorted(k for s in shard_keys for k in s) == _keys(train)
    sizes = [sum(path.stat().st_size for _, path in shard) for shard in shards]
    assert max(sizes) < 2 * min(sizes)


def test_default_corpus_listing_is_deterministic(stdlib_files: list[CorpusFile]) -> None:
    assert list_corpus_files(None) == stdlib_files
