"""Shard files of a prepared dataset, each written under a temporary name and renamed when whole.

- Document shards (ArrayRecord, what grain reads with random access): one JSON record per curated
  document, {"text", "source", "score"} (score: the document group's seeded hash in [0, 1), which
  decides its train/val side).
- Token shards (flat uint16/uint32 files): documents joined by EOS. Window i of a shard covers
  tokens [i*L, i*L + L]: L inputs and, shifted by one, L targets, so consecutive windows share one
  boundary token and every token after a shard's first is a target exactly once; the last
  (n - 1) % L tokens of a shard fill no window and go unused.

Segments: an EOS starts a new segment (it is the next document's "beginning of text"), so in a
window the model attends only within a document and positions restart at each (the model derives
positions from the segments). The first target of a document is predicted from its EOS alone.
"""

from __future__ import annotations

import bisect
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from llm_jax.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(prefix: str, index: int, suffix: str) -> str:
    return f"{prefix}-{index:05d}{suffix}"


class _Rotating:
    """Writes records to <dir>/<prefix>-00000<suffix>, -00001, ... starting a new shard past max_bytes."""

    def __init__(self, directory: Path, prefix: str, suffix: str, max_bytes: int):
        self.directory, self.prefix, self.suffix, self.max_bytes = directory, prefix, suffix, max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._tmp: Path | None = None
        self._size = 0

    def _open(self, tmp: Path): ...
    def _write(self, data): ...
    def _close(self): ...

    def write(self, data) -> None:
        if self._tmp is None:
            self.paths.append(self.directory / shard_name(self.prefix, len(self.paths), self.suffix))
            self._tmp = self.paths[-1].with_name(self.paths[-1].name + ".tmp")
            self._open(self._tmp)
            self._size = 0
        self._write(data)
        self._size += len(data) if isinstance(data, bytes) else data.nbytes
        if self._size >= self.max_bytes:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tmp is not None:
            self._close()
            os.replace(self._tmp, self.paths[-1])
            self._tmp = None

    def close(self) -> list[Path]:
        self.finish_shard()
        return self.paths


_GROUP_SIZE_1 = "group_size:1"  # random access per record


class DocumentWriter(_Rotating):
    """Curated documents as ArrayRecord shards."""

    def __init__(self, directory: Path, max_bytes: int):
        super().__init__(directory, "documents", ".array_record", max_bytes)

    def _open(self, tmp):
        self._writer = ArrayRecordWriter(str(tmp), _GROUP_SIZE_1)

    def _write(self, data):
        self._writer.write(data)

    def _close(self):
        self._writer.close()

    def add(self, text: str, source: str, score: float) -> None:
        self.write(document_record(text, source, score))


def document_record(text: str, source: str, score: float) -> bytes:
    return json.dumps({"text": text, "source": source, "score": score}, ensure_ascii=False).encode()


def write_document_shard(path: Path, records: Iterable[bytes]) -> None:
    """One document shard whole (a temporary name renamed when written), as DocumentWriter writes it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # a retried task's attempt writes its own
    try:
        writer = ArrayRecordWriter(str(tmp), _GROUP_SIZE_1)
        for record in records:
            writer.write(record)
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed write


def read_documents(paths: Iterable[Path]) -> Iterator[dict]:
    """The records of document shards, in order."""
    for path in paths:
        reader = ArrayRecordReader(str(path))
        try:
            for start in range(0, reader.num_records(), 1024):
                for record in reader.read(range(start, min(start + 1024, reader.num_records()))):
                    yield json.loads(record)
        finally:
            reader.close()


def documents_in(path: str | Path, start: int, stop: int) -> list[dict]:
    """Records [start, stop) of one document shard."""
    reader = ArrayRecordReader(str(path))
    try:
        return [json.loads(r) for r in reader.read(range(start, stop))]
    finally:
        reader.close()


def documents_at(paths: list[Path], indices: list[int]) -> Iterator[dict]:
    """The records at these indices of document shards read in order, in index order, by random access, a
    shard's worth at a time."""
    indices, start = sorted(indices), 0
    for path in paths:
        reader = ArrayRecordReader(str(path))
        try:
            n = reader.num_records()
            here = indices[bisect.bisect_left(indices, start) : bisect.bisect_left(indices, start + n)]
            for record in reader.read([i - start for i in here]) if here else ():
                yield json.loads(record)
            start += n
        finally:
            reader.close()


class TokenWriter(_Rotating):
    """Token streams: each document's ids then EOS, appended to the current shard."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eos_id: int, max_bytes: int):
        super().__init__(directory, split, ".bin", max_bytes)
        self.dtype, self.eos_id, self.tokens = dtype, eos_id, 0

    def _open(self, tmp):
        self._file = open(tmp, "wb")  # noqa: SIM115 (open across writes; _close closes it)

    def _write(self, data):
        data.tofile(self._file)

    def _close(self):
        self._file.close()

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids + [self.eos_id], self.dtype)
        self.tokens += arr.size
        self.write(arr)


@dataclass
class Packed:
    shards: dict[tuple[str, str | None], list[str]]  # token stream (split, part) -> its shard files, in order
    tokens: dict[tuple[str, str | None], int]  # token stream -> tokens written (documents and their EOS)
    doc_tokens: np.ndarray  # [kept] int64: tokens of each kept document, without its EOS
    seconds: float


@dataclass
class Routes:
    """Kept document i -> its token stream: (split, mixture part; None: no mixture, or data.val_sources
    beside one), or None for a document the contamination gate took out."""

    is_val: np.ndarray  # [kept] bool
    leaked: np.ndarray  # [kept] bool
    part_of: Callable[[str], str | None]  # a document's source -> its mixture part

    def __call__(self, i: int, source: str) -> tuple[str, str | None] | None:
        return None if self.leaked[i] else ("val" if self.is_val[i] else "train", self.part_of(source))


def stream_prefix(key: tuple[str, str | None]) -> str:
    split, part = key
    return split if part is None else f"{split}.{part}"


class TokenShards:
    """A grain random-access source over token shards: item i is window i, counting windows shard by
    shard, as {"tokens": [L+1] int32, "segments": [L+1] int32}."""

    def __init__(self, paths: Iterable[str | Path], dtype: str, seq_len: int, eos_id: int):
        self.paths, self.dtype, self.seq_len, self.eos_id = [str(p) for p in paths], np.dtype(dtype), seq_len, eos_id
        self._sizes = [n // self.dtype.itemsize for n in _sizes(self.paths)]  # tokens per shard
        counts = [max(0, (n - 1) // seq_len) for n in self._sizes]
        self._starts = np.cumsum([0] + counts).tolist()  # window index where each shard begins
        self._maps: dict[int, np.memmap | tuple] = {}  # opened lazily, so the source pickles into grain workers cheaply

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        shard = bisect.bisect_right(self._starts, i) - 1
        if shard not in self._maps:
            self._maps[shard] = _open(self.paths[shard], self.dtype)
        start = (i - self._starts[shard]) * self.seq_len
        source = self._maps[shard]
        if isinstance(source, np.memmap):
            tokens = np.asarray(source[start : start + self.seq_len + 1], dtype=np.int32)
        else:  # a remote shard: this window's bytes only, one stateless range read (safe from grain's threads)
            fs, inner = source
            first = start * self.dtype.itemsize
            data = fs.cat_file(inner, first, first + (self.seq_len + 1) * self.dtype.itemsize)
            if len(data) != (self.seq_len + 1) * self.dtype.itemsize:
                raise UserError(f"{self.paths[shard]} is shorter than when it was listed: was it rewritten?")
            tokens = np.frombuffer(data, self.dtype).astype(np.int32)
        return {"tokens": tokens, "segments": np.cumsum(tokens == self.eos_id, dtype=np.int32)}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    @property
    def tokens(self) -> int:
        return sum(self._sizes)

    def __repr__(self) -> str:  # grain logs sources by repr; keep it short and stable
        return (
            f"TokenShards({len(self.paths)} shards from {self.paths[0] if self.paths else None!r}, "
            f"seq_len={self.seq_len})"
        )


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def remote_fs(url: str):
    """(fsspec filesystem, its path) of a gs:// (or any fsspec) URL; one line when its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # gcsfs for gs://
        raise UserError(f"reading {url} needs {e}: pip install 'llm_jax[gcs]' for gs://") from None


def _sizes(paths: list[str]) -> list[int]:
    """Bytes of each shard: local ones by stat, remote ones by one listing of each directory (not a request
    per shard); a missing one is one line."""
    listed: dict[str, int] = {}
    for parent in dict.fromkeys(p.rsplit("/", 1)[0] for p in paths if is_remote(p)):
        fs, inner = remote_fs(parent)
        found = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(inner, detail=True)}
        listed |= {f"{parent}/{name}": size for name, size in found.items()}
    missing = [p for p in paths if not (p in listed if is_remote(p) else os.path.isfile(p))]
    if missing:
        raise UserError(f"the token shard {missing[0]} is missing ({len(missing)} of {len(paths)}): rebuild the data")
    return [listed[p] if is_remote(p) else os.path.getsize(p) for p in paths]


def _open(path: str, dtype: np.dtype):
    """A local shard memory-mapped; a remote one as (filesystem, path), read a window at a time."""
    return remote_fs(path) if is_remote(path) else np.memmap(path, dtype=dtype, mode="r")


def write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def read_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt; delete {path.parent} to rebuild the prepared data") from None
