"""Token streams on disk: documents joined by EOS into one flat array, read as fixed windows.

Window i covers tokens [i*L, i*L + L]: L inputs and, shifted by one, L targets. Consecutive
windows share one boundary token, so every token after the first is a target exactly once; only
the last (n - 1) % L tokens, which do not fill a window, go unused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from llm_jax.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_stream(docs: Iterable[list[int]], eos_id: int, path: Path, dtype: np.dtype) -> int:
    """Writes doc + [eos] for each doc to `path` (atomically); returns the token count."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for ids in docs:
            arr = np.asarray(list(ids) + [eos_id], dtype=dtype)
            arr.tofile(f)
            n += arr.size
    os.replace(tmp, path)
    return n


class TokenWindows:
    """A grain random-access source: item i is window i of the stream, [seq_len + 1] int32."""

    def __init__(self, path: str | Path, dtype: str, seq_len: int):
        self.path, self.dtype, self.seq_len = str(path), np.dtype(dtype), seq_len
        n_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        self._len = max(0, (n_tokens - 1) // seq_len)
        self._tokens = None  # opened lazily, so the source pickles into grain workers cheaply

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = int(i) * self.seq_len
        return np.asarray(self._tokens[start:start + self.seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:  # grain logs sources by repr; keep it short and stable
        return f"TokenWindows({self.path!r}, seq_len={self.seq_len})"


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
        raise UserError(f"{path} is corrupt; delete {path.parent} to rebuild the packed data") from None
