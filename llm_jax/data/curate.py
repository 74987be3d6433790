"""Curation, one streaming pass: documents -> cleaning -> quality rules -> exact and near dedup ->
ArrayRecord document shards, with every removed document counted against the first rule that
removed it (llm_jax/data/filters.py, llm_jax/data/dedup.py).

Cleaning, the rules and the hashing run in `data.workers` processes on batches of documents; the
decisions (dedup keeps the first copy in source order) are taken here, in order, so the output is
the same whatever the number of workers. Memory grows with the kept documents only: a 16-byte exact
key, a MinHash signature and a few numbers each, never their text.

Validation: `data.val_sources` are read first, so a training document that copies one of them is
the copy that is dropped (counted as `contamination`). Without them, a document's side follows a
seeded hash of its group (`score` < data.val_fraction is validation), decided after this pass.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_jax.config import Config, CurateConfig, DataConfig
from llm_jax.data import dedup, filters
from llm_jax.data.corpus import Document, ReadStats, read_documents
from llm_jax.data.progress import rate_line, ticker
from llm_jax.data.shards import DocumentWriter
from llm_jax.errors import UserError

EXAMPLES_PER_RULE = 3  # removed documents quoted in the report, per rule
EXAMPLE_CHARS = 300
_BATCH_BYTES = 1 << 20  # text handed to a worker at a time
_AHEAD = 4  # batches in flight per worker: bounds memory, keeps workers busy


@dataclass
class Curated:
    paths: list[Path]  # document shards
    scores: np.ndarray  # [kept] float64: group hash in [0, 1); -1 for a data.val_sources document
    sizes: np.ndarray  # [kept, 2] int64: UTF-8 bytes, words of each kept document
    read: ReadStats
    removed: dict[str, list[int]]  # rule -> [documents, bytes]
    examples: dict[str, list[dict]]  # rule -> a few removed documents
    clusters: dict  # near-duplicate clusters
    seconds: float


def group_score(seed: int, group: str) -> float:
    """A stable hash of (seed, group) in [0, 1): the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}\0{group}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def curate(cfg: Config, out_dir: Path, log=print) -> Curated:
    d, c = cfg.data, cfg.curate
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, began = ReadStats(), time.perf_counter()
    near = dedup.NearDedup(c.near_dedup, c.minhash_perms, c.shingle_words, cfg.seed) if c.near_dedup else None
    exact: dict[bytes, int] = {}  # exact key -> kept index
    scores, sizes = [], []
    removed = collections.defaultdict(lambda: [0, 0])
    removed_training = collections.defaultdict(lambda: [0, 0])  # of data.sources, when data.val_sources is set
    examples = collections.defaultdict(list)
    cluster_sizes = collections.Counter()  # kept index -> near copies dropped
    pairs = []
    writer = DocumentWriter(out_dir, int(d.shard_mb * 2**20))
    progress_due = ticker(d.progress_s)

    def drop(rule: str, doc: Document, n_bytes: int, score: float) -> None:
        for counts in (removed, removed_training) if score >= 0 else (removed,):
            counts[rule][0] += 1
            counts[rule][1] += n_bytes
        if len(examples[rule]) < EXAMPLES_PER_RULE:
            examples[rule].append({"source": doc.source, "text": doc.text[:EXAMPLE_CHARS]})

    for doc, score, (text, rule, key, sig, n_bytes) in _processed(cfg, _scored(cfg, stats), log):
        if progress_due():
            log(rate_line("curating", stats.bytes, began, f"{stats.documents:,} read, {len(scores):,} kept"))
        if rule is None and c.exact_dedup and key in exact:
            first, rule = exact[key], "exact_dup"
        elif rule is None and near is not None:
            first = near.check_and_add(sig)
            rule = None if first is None else "near_dup"
        if rule in ("exact_dup", "near_dup") and scores[first] < 0 <= score:
            rule = "contamination"  # a training copy of a data.val_sources document
        if rule == "near_dup":
            cluster_sizes[first] += 1
            if len(pairs) < EXAMPLES_PER_RULE:
                pairs.append({"kept": first, "dropped": doc.source})  # kept: index, named in prepare's pass
        if rule is not None:
            drop(rule, doc, n_bytes, score)
            continue
        if c.exact_dedup:
            exact[key] = len(scores)
        scores.append(score)
        sizes.append((len(text.encode("utf-8", "surrogatepass")), len(text.split())))
        writer.add(text, doc.source, score)
    paths = writer.close()
    check_kept(d, stats, np.asarray(scores), removed, removed_training)
    clusters = {
        "clusters": len(cluster_sizes),
        "largest": max(cluster_sizes.values(), default=-1) + 1,
        "examples": pairs,
    }
    return Curated(
        paths,
        np.asarray(scores, np.float64),
        np.asarray(sizes, np.int64).reshape(-1, 2),
        stats,
        dict(removed),
        dict(examples),
        clusters,
        time.perf_counter() - began,
    )


def check_kept(d: DataConfig, stats: ReadStats, scores: np.ndarray, removed: dict, removed_training: dict) -> None:
    """One line naming the rules that emptied the corpus, or its training side, and how to relax them."""
    if stats.documents == 0:
        raise UserError(f"the corpus {list(d.sources)} holds no documents: every file is empty, binary or skipped")
    if not len(scores):
        worst = _worst(removed)
        raise UserError(
            f"curation kept none of the {stats.documents} documents ({_summary(removed)}); "
            f"{worst!r} removed the most: {_fix_hint(worst)}"
        )
    if d.val_sources and max(scores) < 0:  # validation kept, training not: the tokenizer would have no text
        worst = _worst(removed_training)
        if worst is None:
            raise UserError(f"the training sources {list(d.sources)} hold no documents: every file is empty or skipped")
        raise UserError(
            f"curation kept none of the training documents of {list(d.sources)} ({_summary(removed_training)}); "
            f"{worst!r} removed the most: {_fix_hint(worst)}"
        )


def _summary(removed: dict) -> str:
    """Rules by documents removed, ties by name: the same line whatever order the counts were made in."""
    return ", ".join(f"{rule}: {n}" for rule, (n, _) in sorted(removed.items(), key=lambda kv: (-kv[1][0], kv[0])))


def _worst(removed: dict) -> str | None:
    return min(removed, key=lambda r: (-removed[r][0], r), default=None)


def _fix_hint(rule: str) -> str:
    if rule == "empty":
        return "the documents hold no text after cleaning (is data.text_field right? is it markup only?)"
    if rule in ("exact_dup", "near_dup", "contamination"):
        return (
            "the documents copy each other or data.val_sources; set curate.exact_dedup=false / curate.near_dedup=null"
        )
    return f"relax its threshold in the curate section, or drop {rule!r} from curate.rules"


def sides(cfg: Config) -> list[tuple[tuple[str, ...], Callable[[str], float]]]:
    """(sources, group -> score) in reading order: data.val_sources (score -1), then data.sources (the
    group's hash, or 1 when data.val_sources decide validation)."""
    d = cfg.data
    train = (lambda g: 1.0) if d.val_sources else (lambda g: group_score(cfg.seed, g))
    return [(d.val_sources, lambda g: -1.0), (d.sources, train)]


def _scored(cfg: Config, stats: ReadStats) -> Iterator[tuple[Document, float]]:
    d = cfg.data
    for sources, score in sides(cfg):
        for doc in read_documents(
            sources, d.text_field, d.cache_dir, d.bad_rows, d.tfds_data_dir, stats, d.txt_split_kb
        ):
            yield doc, score(doc.group)


def _batches(docs: Iterable[tuple[Document, float]]) -> Iterator[list[tuple[Document, float]]]:
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[0].text)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _processed(cfg: Config, docs, log) -> Iterator[tuple[Document, float, tuple]]:
    """(document, score, (clean text, failing rule, exact key, signature, bytes)) in input order."""
    workers = cfg.data.workers or os.cpu_count() or 1
    args = (cfg.curate, cfg.seed)
    batches = _batches(docs)
    if workers > 1:
        # spawn, not fork: the parent may already run JAX's threads
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init, args) as pool:
            try:
                pool.submit(_work, []).result()  # workers that cannot start fail here, not mid-run
            except BrokenProcessPool:
                log(
                    "note: curation worker processes could not start (is the main program a file? spawned "
                    "workers re-import it); curating in this process"
                )
            else:
                pending = collections.deque()
                for batch in batches:
                    pending.append((batch, pool.submit(_work, [doc.text for doc, _ in batch])))
                    if len(pending) >= _AHEAD * workers:
                        batch, result = pending.popleft()
                        yield from zip(*zip(*batch), result.result())
                while pending:
                    batch, result = pending.popleft()
                    yield from zip(*zip(*batch), result.result())
                return
    _init(*args)
    for batch in batches:
        yield from zip(*zip(*batch), _work([doc.text for doc, _ in batch]))


_worker: dict = {}


def _init(curate: CurateConfig, seed: int) -> None:
    _worker["cfg"] = curate
    _worker["hasher"] = dedup.MinHasher(curate.minhash_perms, curate.shingle_words, seed) if curate.near_dedup else None


def _work(texts: list[str]) -> list[tuple]:
    cfg, hasher, out = _worker["cfg"], _worker["hasher"], []
    for raw in texts:
        n_bytes = len(raw.encode("utf-8", "surrogatepass"))
        text, markup = filters.clean(raw, cfg)
        rule = "empty" if not text.strip() else filters.failing_rule(text, markup, cfg)
        if rule is not None:
            out.append((text, rule, None, None, n_bytes))
            continue
        key = dedup.exact_key(text) if cfg.exact_dedup else None
        out.append((text, None, key, hasher.signature(text) if hasher else None, n_bytes))
    return out
