"""Exact and near (MinHash LSH) deduplication for streaming curation: only compact per-document
state is kept, a 16-byte exact key and a [num_perm] uint32 signature, never the text.

- exact_key: blake2b-16 of the text lowercased, Unicode punctuation and symbols removed, whitespace
  collapsed: "Hello,  World!" and "hello world" share a key.
- MinHasher: shingles are the sets of `shingle_words` consecutive lowercased words. Each word is
  hashed once with zlib.crc32; a shingle's hash is ((sum_j c_j * word_j + c_k) mod 2**64) >> 32 and
  permutation i maps it to ((a_i * h + b_i) mod 2**64) >> 32, with 64-bit c, a, b drawn from
  default_rng(seed): multiply-add-shift hashing (Dietzfelbinger), pairwise independent, and exact
  in wrapping uint64 arithmetic. Deterministic across processes and runs (no salted `hash()`).
  (Not (a * h + b) mod 2**61 - 1 with a, b < 2**32 to avoid overflow: a * h then stays below p
  for small h, so every permutation orders low shingle hashes alike and unrelated texts can share
  most of their signature.)
  Throughput: ~8.5 MB/s of English text on one core (signature, 128 perms, 5-word shingles;
  Shakespeare's plays whole and cut into ~3.7 KB documents, 2-core shared x86 machine).
- lsh_params / NearDedup: bands x rows such that a copy at the threshold is a candidate 99% of the time;
  a candidate sharing a band bucket counts as a duplicate when its estimated Jaccard (share of equal
  signature entries) >= threshold.
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from functools import cache

import numpy as np

_32 = np.uint64(32)
_CHUNK = 1024  # shingles per [num_perm, chunk] block: bounds memory (1 MiB at 128 perms)


class _PunctSymbols(dict):
    """str.translate table deleting Unicode punctuation (P*) and symbols (S*), filled lazily."""

    def __missing__(self, code: int):
        value = None if unicodedata.category(chr(code))[0] in "PS" else code
        self[code] = value
        return value


_STRIP = _PunctSymbols()


def exact_key(text: str) -> bytes:
    """16-byte blake2b digest of the normalized text (case, punctuation, symbols, whitespace folded)."""
    norm = " ".join(text.lower().translate(_STRIP).split())
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class MinHasher:
    """MinHash signatures of word-shingle sets: `signature(text)` -> [num_perm] uint32."""

    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle_words = num_perm, shingle_words
        # Shingle hash: sum_j coef[j] * word[i + j] + coef[k] (mod 2**64), top 32 bits.
        self._coef = rng.integers(0, 2**64, shingle_words + 1, dtype=np.uint64, endpoint=False)
        # Permutation i: ((a[i] * h + b[i]) mod 2**64) >> 32 with 64-bit a, b (multiply-add-shift).
        self._a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)[:, None]  # [P, 1]
        self._b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)[:, None]  # [P, 1]

    def shingle_hashes(self, text: str) -> np.ndarray:
        """[n_shingles] uint64 values < 2**32 (n_shingles = max(words - k + 1, 1); 0 for no words)."""
        words = text.lower().split()
        n = max(len(words) - self.shingle_words + 1, 1) if words else 0
        return _window_hashes(words, self._coef, n) >> _32

    def signature(self, text: str) -> np.ndarray:
        """[num_perm] uint32: per permutation, min over the shingles of (a * h + b) mod 2**64, its
        top 32 bits. A text with no words gets all 2**32 - 1 (callers skip empty text)."""
        h = self.shingle_hashes(text)
        if len(h) == 0:
            return np.full(self.num_perm, 2**32 - 1, np.uint32)
        best = np.full(self.num_perm, 2**64 - 1, np.uint64)
        x = np.empty((self.num_perm, min(len(h), _CHUNK)), np.uint64)  # [P, C]
        for start in range(0, len(h), _CHUNK):
            chunk = h[start : start + _CHUNK]
            xc = x[:, : len(chunk)]
            np.multiply(self._a, chunk, out=xc)  # wraps mod 2**64
            xc += self._b
            np.minimum(best, xc.min(axis=1), out=best)
        return (best >> _32).astype(np.uint32)  # the shift keeps order: min of the top bits


# A near copy exactly at the threshold shares a band bucket with its original at least this often; whether it
# is then removed is the signature's estimate's call. datasketch's choice (equal weights on the false-positive
# and false-negative areas: 9 bands x 13 rows at 0.8) made a copy at Jaccard 0.82 a candidate half the time.
RECALL_AT_THRESHOLD = 0.99


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """[n-grams] uint64: 64-bit hashes of the text's n-word windows, words normalised as exact_key's
    (case, punctuation and symbols folded); none for a text of fewer than n words (the contamination
    gate's n-grams: data/contamination.py)."""
    words = text.lower().translate(_STRIP).split()
    if len(words) < n:
        return np.zeros(0, np.uint64)
    return _window_hashes(words, _ngram_coefficients(n), len(words) - n + 1)


def _window_hashes(words: list[str], coef: np.ndarray, windows: int) -> np.ndarray:
    """[windows] uint64: window i hashes words i, i + 1, ... (up to len(coef) - 1 of them) as
    sum_j coef[j] * crc32(word_{i+j}) + coef[-1] (mod 2**64, multilinear)."""
    encoded = (w.encode("utf-8", "surrogatepass") for w in words)
    w = np.fromiter(map(zlib.crc32, encoded), np.uint64, len(words))  # [W]
    h = np.full(windows, coef[-1], np.uint64)
    for j in range(min(len(coef) - 1, len(words))):
        h += w[j : j + windows] * coef[j]  # wraps mod 2**64
    return h


@cache
def _ngram_coefficients(n: int) -> np.ndarray:
    return np.random.default_rng([n, 13]).integers(0, 2**64, n + 1, dtype=np.uint64, endpoint=False)


@cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm: of those whose S-curve 1 - (1 - s**rows)**bands reaches
    RECALL_AT_THRESHOLD at the threshold, the one with the least false-positive area below it (trapezoid rule
    on 1001 points), i.e. the fewest candidates to confirm (fewer bands first on a tie: less index memory)."""
    lo = np.linspace(0.0, threshold, 1001)
    best, best_fp = (num_perm, 1), float("inf")
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            if 1 - (1 - threshold**rows) ** bands < RECALL_AT_THRESHOLD:
                continue
            fp = np.trapezoid(1 - (1 - lo**rows) ** bands, lo)
            if fp < best_fp - 1e-12:
                best, best_fp = (bands, rows), fp
            break  # more bands of these rows only add false positives
    return best


class NearDedup:
    """In-memory MinHash LSH index over the signatures of kept documents, indexed 0, 1, ... in the
    order added. Memory per kept document: its num_perm * 4-byte signature (in an array doubled when
    full, so up to twice that) plus one dict entry per band (a 64-bit int key and an index, ~70
    bytes): 2.1 KB at 128 perms and 16 bands (benchmarks/data_throughput.py), more while the array doubles."""

    def __init__(self, threshold: float, num_perm: int, shingle_words: int, seed: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.hasher = MinHasher(num_perm, shingle_words, seed)  # signatures this index expects
        self._key_coef = np.random.default_rng([seed, 1]).integers(0, 2**64, self.rows, np.uint64)  # [R]
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((16, num_perm), np.uint32)  # [capacity, num_perm], doubled when full
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def signatures(self) -> np.ndarray:
        """[added, num_perm] uint32 signatures of the added documents (a view)."""
        return self._sigs[: self._n]

    def _keys(self, sig: np.ndarray) -> list[int]:
        """One deterministic 64-bit key per band: a multilinear hash of its rows."""
        rows = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)  # [B, R]
        return (rows * self._key_coef).sum(axis=1, dtype=np.uint64).tolist()  # wraps mod 2**64

    def _match(self, sig: np.ndarray, keys: list[int]) -> int | None:
        found: set[int] = set()
        for bucket, key in zip(self._buckets, keys):
            hit = bucket.get(key)
            if isinstance(hit, list):
                found.update(hit)
            elif hit is not None:
                found.add(hit)
        if not found:
            return None
        cands = np.fromiter(sorted(found), np.int64, len(found))
        jaccard = (self._sigs[cands] == sig).sum(axis=1) / sig.shape[0]  # [candidates]
        ok = np.flatnonzero(jaccard >= self.threshold)
        return int(cands[ok[0]]) if len(ok) else None

    def query(self, sig: np.ndarray) -> int | None:
        """Index of the first added document whose estimated Jaccard with `sig` reaches the
        threshold among those sharing a band bucket, else None. Adds nothing."""
        return self._match(sig, self._keys(sig))

    def check_and_add(self, sig: np.ndarray) -> int | None:
        """As `query`; when there is no match, adds `sig` (index len(self)) and returns None."""
        keys = self._keys(sig)
        first = self._match(sig, keys)
        if first is not None:
            return first
        if self._n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[self._n] = sig
        for bucket, key in zip(self._buckets, keys):
            hit = bucket.get(key)
            if hit is None:
                bucket[key] = self._n
            elif isinstance(hit, list):
                hit.append(self._n)
            else:
                bucket[key] = [hit, self._n]
        self._n += 1
        return None
