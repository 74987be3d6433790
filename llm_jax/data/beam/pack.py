"""Tokenizing and packing on Apache Beam (data.engine=beam): prepare.py's _pack spread over a runner's
workers, with its files byte for byte.

    document shards --read and tokenize (1,024 documents a task)--> each document's tokens and stream
        '-- sizes (no tokens) --> assign (one task: 3 numbers a document) --> each document's shard
    tokens joined to their shard -- grouped by shard --> <split>[.<part>]-NNNNN.bin, documents in order

A stream's shards rotate where TokenWriter's would (shard_indices over the documents' bytes in order).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np

from llm_jax.config import Config
from llm_jax.data.beam import runner
from llm_jax.data.curate import Curated
from llm_jax.data.shards import Packed, Routes, documents_in, shard_name, stream_prefix
from llm_jax.data.tokenizer import load_tokenizer


def pack_beam(
    cfg: Config, cur: Curated, tokenizer_path: Path, dtype, keys: list, route: Routes, out: Path, log
) -> Packed:
    began = time.perf_counter()
    scratch = runner.scratch_dir(out / "beam.partial")
    tasks = runner.document_tasks(cur.paths)
    routes = scratch / "routes.npz"  # a byte or two per document: read by the workers, not inside the pipeline
    np.savez(routes, is_val=route.is_val, leaked=route.leaked)
    args = (str(tokenizer_path), np.dtype(dtype).name, dataclasses.replace(route, is_val=None, leaked=None), routes)
    shard_bytes = int(cfg.data.shard_mb * 2**20)
    build = lambda p: _graph(p, tasks, args, shard_bytes, out, scratch)  # noqa: E731
    runner.run(cfg.data, scratch, build, f"tokenizing {len(cur.scores):,} documents", "tokenizing", log)
    assigned = runner.load(scratch, "assign")
    runner.done(scratch)
    shards = {
        key: [shard_name(stream_prefix(key), i, ".bin") for i in range(assigned["shards"].get(key, 0))] for key in keys
    }
    tokens = {key: assigned["tokens"].get(key, 0) for key in keys}
    return Packed(shards, tokens, assigned["doc_tokens"], time.perf_counter() - began)


def _graph(p, tasks: list, args: tuple, shard_bytes: int, out: Path, scratch: Path) -> None:
    docs = (
        p
        | "tasks" >> beam.Create(tasks)
        | "spread" >> beam.Reshuffle()
        | "tokenize" >> beam.ParDo(_Tokenize(*args, scratch)).with_outputs("size", main="tokens")
    )
    assigned = (
        p
        | "once" >> beam.Create([None])
        | "assign" >> beam.Map(_assign, beam.pvalue.AsList(docs.size), np.dtype(args[1]).itemsize, shard_bytes)
    )
    runner.saved(assigned | "summary" >> beam.Map(lambda x: x[0]), scratch, "assign")
    (
        {"shard": assigned | "shard of each" >> beam.FlatMap(lambda x: x[1]), "tokens": docs.tokens}
        | "join" >> beam.CoGroupByKey()
        | "to shards" >> beam.FlatMap(lambda kv: [(s, (kv[0], kv[1]["tokens"][0])) for s in kv[1]["shard"]])
        | "by shard" >> beam.GroupByKey()
        | "write" >> beam.Map(_write, out)
    )


class _Tokenize(beam.DoFn):
    """(first index, shard, first record, end) -> tokens (i, [ids..., EOS] in the token dtype's bytes) of
    the documents that go to a stream, and size (i, stream or None, tokens without EOS) of each."""

    def __init__(self, tokenizer_path: str, dtype: str, route: Routes, arrays: Path, scratch: Path):
        self.tokenizer_path, self.dtype, self.route, self.arrays = tokenizer_path, np.dtype(dtype), route, arrays
        self.counter = runner.Counter(scratch)

    def setup(self):
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        with np.load(self.arrays) as a:
            self.route = dataclasses.replace(self.route, is_val=a["is_val"], leaked=a["leaked"])
        self.counter.start()

    def finish_bundle(self):
        self.counter.flush()

    def process(self, task):
        first, path, a, b = task
        records = documents_in(path, a, b)
        encoded = self.tokenizer.encode_batch([r["text"] for r in records])
        for i, (record, ids) in enumerate(zip(records, encoded), first):
            self.counter.add(len(record["text"].encode("utf-8", "surrogatepass")))
            key = self.route(i, record["source"])
            yield beam.pvalue.TaggedOutput("size", (i, key, len(ids)))
            if key is not None:
                yield i, np.asarray(ids + [self.tokenizer.eos_id], self.dtype).tobytes()


def _assign(_, sizes: list, itemsize: int, shard_bytes: int):
    """-> ({"shards": stream -> shard count, "tokens": stream -> tokens, "doc_tokens": [kept] tokens without
    EOS}, [(i, (stream, shard)) of each document written])."""
    doc_tokens = np.zeros(len(sizes), np.int64)
    streams = collections.defaultdict(list)  # stream -> [(i, tokens with EOS)] in order
    for i, key, n in sorted(sizes, key=lambda x: x[0]):
        doc_tokens[i] = n
        if key is not None:
            streams[key].append((i, n + 1))
    where, summary = [], {"shards": {}, "tokens": {}, "doc_tokens": doc_tokens}
    for key, docs in streams.items():
        shards = list(runner.shard_indices((n * itemsize for _, n in docs), shard_bytes))
        where += [(i, (key, shard)) for (i, _), shard in zip(docs, shards)]
        summary["shards"][key], summary["tokens"][key] = shards[-1] + 1, sum(n for _, n in docs)
    return summary, where


def _write(group, out: Path) -> None:
    (key, shard), docs = group
    path = out / shard_name(stream_prefix(key), shard, ".bin")
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # a retried task's attempt writes its own
    try:
        with open(tmp, "wb") as f:
            for _, data in sorted(docs):
                f.write(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed write
