"""Curation on Apache Beam (data.engine=beam; pip install 'llm_jax[beam]'): llm_jax/data/curate.py's stages
spread over a Beam runner's workers, with its result: byte-identical document shards, the same kept
documents, scores, removal counts, examples and near-duplicate clusters.

    files --read (a file per task)--> documents, each with its order (file index, index in the file)
      '-- spread --clean, rules, exact key, MinHash (curate.py's worker code)--> judged documents
      |-- failed a rule ---------------------------------------------> tallied per rule (a combiner)
      '-- passed -- group by exact key --> first copy of each text -- LSH band buckets --> near pairs
                                                 |                        (j, i < j, estimated Jaccard >= t)
        decide (one task; no text, ~0.8 KB a document) <-----------------'
          '--> each kept document's index and shard -- joined to its text -- grouped by shard --> documents-NNNNN

The streaming pass keeps the first copy in source order; so does this. `decide` replays its loop over
the exact groups and near pairs, in source order: a document whose exact key a kept one has is an exact
duplicate of it; otherwise the streaming pass asks its LSH index, whose answer is the lowest kept index
among the document's near pairs (none: kept). The pairs are computed for the first document of each
(exact key, signature) in parallel: texts with one key can differ in punctuation, which the signature
sees, so each such variant is asked on its own; a later document with the same key and signature gets
its first's answer (the index only grows by later indices). Shard boundaries come from the records'
sizes in kept order, as DocumentWriter rotates them.

What one task holds: `decide` the passing documents' order, score and sizes (824 bytes a document at its
peak, benchmarks/data_throughput.py; the local engine's index holds ~2.2 KB a kept one), a band bucket its
members' signatures. Everything else is spread. Runners: Beam's FnApiRunner in multi-process mode by default
(data.workers processes); a cluster runner (Flink, Spark) through data.beam_options, with the dataset
directory and the sources on storage every worker reads and writes (the workers write the shards).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import apache_beam as beam
import numpy as np

from llm_jax.config import Config
from llm_jax.data import curate as local
from llm_jax.data import dedup
from llm_jax.data.beam import runner
from llm_jax.data.corpus import ReadStats, read_file, source_files
from llm_jax.data.shards import document_record, shard_name, write_document_shard
from llm_jax.errors import UserError

_FILE_DOCS = 1 << 40  # a document's order: its file's index x _FILE_DOCS + its index in the file


def curate_beam(cfg: Config, out_dir: Path, log=print) -> local.Curated:
    d, began = cfg.data, time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = runner.scratch_dir(out_dir / "beam.partial")
    files, stats_before = [], []  # (order base, side, source, path); per source its resolving notes
    for side, (sources, _) in enumerate(local.sides(cfg)):
        for source in sources:
            notes = ReadStats()
            paths = source_files(source, d.cache_dir, notes)
            stats_before.append((len(files), notes))
            files += [((len(files) + i) * _FILE_DOCS, side, source, path) for i, path in enumerate(paths)]
    build = lambda p: _graph(p, cfg, files, out_dir, scratch)  # noqa: E731
    runner.run(d, scratch, build, f"curating {len(files)} files", "curating", log)
    kept, tallies, per_file, examples = (runner.load(scratch, n) for n in ("decide", "tallies", "files", "examples"))
    stats = ReadStats()
    for _, item in sorted([*stats_before, *[(base // _FILE_DOCS, s) for base, s in per_file]], key=lambda x: x[0]):
        if isinstance(item, str):
            raise UserError(item)  # the first failing file's message (data.bad_rows=strict)
        stats.add(item)
    removed, removed_training, shown = kept["removed"], kept["removed_training"], collections.defaultdict(list)
    for rule, (docs, n_bytes, train_docs, train_bytes, first) in tallies.items():
        removed[rule], shown[rule] = [docs, n_bytes], [{"source": s, "text": t} for s, t in first]
        if train_docs:
            removed_training[rule] = [train_docs, train_bytes]
    for rule, orders in kept["example_orders"].items():
        shown[rule] = [{"source": examples[o][0], "text": examples[o][1]} for o in orders]
    local.check_kept(d, stats, kept["scores"], removed, removed_training)
    clusters = kept["clusters"] | {
        "examples": [{"kept": first, "dropped": examples[o][0]} for first, o in kept["clusters"]["examples"]]
    }
    runner.done(scratch)
    paths = [out_dir / shard_name("documents", i, ".array_record") for i in range(kept["shards"])]
    return local.Curated(
        paths,
        kept["scores"],
        kept["sizes"],
        stats,
        removed,
        dict(shown),
        clusters,
        time.perf_counter() - began,
    )


def _graph(p, cfg: Config, files: list, out_dir: Path, scratch: Path) -> None:
    c = cfg.curate
    read = (
        p
        | "files" >> beam.Create(files)
        | "spread files" >> beam.Reshuffle()
        | "read" >> beam.ParDo(_Read(cfg)).with_outputs("file", main="docs")
    )
    docs = (
        read.docs
        | "spread documents" >> beam.Reshuffle()  # a large file's documents over all workers
        | "process" >> beam.ParDo(_Process(cfg, scratch)).with_outputs("failed", main="passed")
    )
    # passed: (order, (score, exact key, signature, n_bytes, (bytes, words), record, source, head))
    meta = docs.passed | "meta" >> beam.Map(lambda kv: (kv[0], kv[1][:5] + (len(kv[1][5]),)))
    if c.exact_dedup:
        groups = meta | "by key" >> beam.Map(lambda kv: (kv[1][1], kv)) | "exact" >> beam.GroupByKey()
        split = groups | "first copies" >> beam.FlatMap(_first_copies).with_outputs("copy", main="first")
        firsts, copies = split.first, split.copy
    else:
        firsts, copies = meta, p | "no copies" >> beam.Create([])
    if c.near_dedup:
        pairs = (
            firsts
            | "bands" >> beam.ParDo(_Bands(cfg))
            | "buckets" >> beam.GroupByKey()
            | "near pairs" >> beam.ParDo(_NearPairs(cfg))
        )
    else:
        pairs = p | "no pairs" >> beam.Create([])
    decided = (
        p
        | "once" >> beam.Create([None])
        | "decide"
        >> beam.Map(
            _decide,
            beam.pvalue.AsList(firsts | "first meta" >> beam.Map(lambda kv: (kv[0], *kv[1][:2], kv[1][3:]))),
            beam.pvalue.AsList(copies),
            beam.pvalue.AsList(pairs),
            int(cfg.data.shard_mb * 2**20),
        )
    )
    summary = decided | "summary" >> beam.Map(lambda x: x[0])
    runner.saved(summary, scratch, "decide")
    shards = decided | "shard of each" >> beam.FlatMap(lambda x: x[1])  # (order, shard)
    (
        {"shard": shards, "doc": docs.passed | "records" >> beam.Map(lambda kv: (kv[0], kv[1][5]))}
        | "join" >> beam.CoGroupByKey()
        | "to shards" >> beam.FlatMap(lambda kv: [(s, (kv[0], kv[1]["doc"][0])) for s in kv[1]["shard"]])
        | "by shard" >> beam.GroupByKey()
        | "write" >> beam.Map(_write_shard, out_dir)
    )
    wanted = summary | "wanted" >> beam.Map(_example_orders)
    examples = (
        docs.passed
        | "pick examples" >> beam.FlatMap(_pick, beam.pvalue.AsSingleton(wanted))
        | "examples" >> beam.combiners.ToDict()
    )
    runner.saved(examples, scratch, "examples")
    runner.saved(docs.failed | "tally" >> beam.CombinePerKey(_Tally()) | beam.combiners.ToDict(), scratch, "tallies")
    runner.saved(read.file | "per file" >> beam.combiners.ToList(), scratch, "files")


class _Read(beam.DoFn):
    """A file -> its documents (order, (text, source, score)) and one tagged (file base, ReadStats or the
    error line of data.bad_rows=strict)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def process(self, item):
        base, side, source, path = item
        score, d, stats = local.sides(self.cfg)[side][1], self.cfg.data, ReadStats()
        try:
            docs = read_file(source, path, d.text_field, d.bad_rows, d.tfds_data_dir, stats, d.txt_split_kb)
            for i, doc in enumerate(docs):
                yield base + i, (doc.text, doc.source, score(doc.group))  # primitives: Beam's fast coder
        except UserError as e:
            yield beam.pvalue.TaggedOutput("file", (base, str(e)))
            return
        yield beam.pvalue.TaggedOutput("file", (base, stats))


class _Process(beam.DoFn):
    """A document cleaned, judged and hashed (curate.py's worker code) -> passed (order, (score, exact key,
    signature, n_bytes, sizes, record, source, head)) or failed (rule, (order, score, n_bytes, source, head))."""

    def __init__(self, cfg: Config, scratch: Path):
        self.cfg, self.counter = cfg, runner.Counter(scratch)

    def setup(self):
        local._init(self.cfg.curate, self.cfg.seed)
        self.counter.start()

    def finish_bundle(self):
        self.counter.flush()

    def process(self, item):
        order, (raw, source, score) = item
        text, rule, key, sig, n_bytes = local._work([raw])[0]
        self.counter.add(n_bytes)
        head = raw[: local.EXAMPLE_CHARS]
        if rule is not None:
            yield beam.pvalue.TaggedOutput("failed", (rule, (order, score, n_bytes, source, head)))
            return
        sizes = (len(text.encode("utf-8", "surrogatepass")), len(text.split()))
        sig = None if sig is None else sig.tobytes()  # bytes travel faster than arrays
        yield order, (score, key, sig, n_bytes, sizes, document_record(text, source, score), source, head)


def _first_copies(group):
    """An exact group -> the first document of each signature in it (main: what the streaming index would
    be asked about) and the others tagged copy: (order, (their signature's first order, score, n_bytes,
    key)). Texts with one key may differ in punctuation, which the signature sees: each its own question."""
    key, members = group
    first_of_sig = {}
    for order, m in sorted(members, key=lambda kv: kv[0]):
        if m[2] not in first_of_sig:
            first_of_sig[m[2]] = order
            yield order, m
        else:
            yield beam.pvalue.TaggedOutput("copy", (order, (first_of_sig[m[2]], m[0], m[3], key)))


class _Bands(beam.DoFn):
    """A first copy -> ((band, bucket key), (order, signature)) for each LSH band (NearDedup's keys)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup(self):
        c = self.cfg.curate
        self.near = dedup.NearDedup(c.near_dedup, c.minhash_perms, c.shingle_words, self.cfg.seed)

    def process(self, kv):
        order, m = kv
        for band, key in enumerate(self.near._keys(np.frombuffer(m[2], np.uint32))):
            yield (band, key), (order, m[2])


class _NearPairs(_Bands):
    """A band bucket -> (j, i) for i < j in it whose estimated Jaccard (NearDedup's) reaches the threshold,
    each pair from the lowest band the two share only. A cluster of m near copies still gives its
    m (m - 1) / 2 pairs to `decide` (the streaming index keeps one of them and compares each new copy with it)."""

    def process(self, bucket):
        (band, _), members = bucket
        members = sorted(members, key=lambda m: m[0])  # a runner's group may be a lazy iterable: no len() before
        if len(members) < 2:
            return
        sigs = np.stack([np.frombuffer(m[1], np.uint32) for m in members])  # [members, perms]
        keys = np.asarray([self.near._keys(sig)[:band] for sig in sigs], np.uint64).reshape(len(members), band)
        for j in range(1, len(members)):
            close = (sigs[:j] == sigs[j]).sum(axis=1) / sigs.shape[1] >= self.near.threshold
            seen = (keys[:j] == keys[j]).any(axis=1)  # shared an earlier band: paired there
            for i in np.flatnonzero(close & ~seen):
                yield members[j][0], members[i][0]


def _decide(_, firsts: list, copies: list, pairs: list, shard_bytes: int):
    """The streaming pass's decisions (module docstring) -> (summary, [(order, shard) of each kept document])."""
    near_of = collections.defaultdict(set)
    for j, i in pairs:
        near_of[j].add(i)
    events = sorted([(o, True, rest) for o, *rest in firsts] + [(o, False, rest) for o, rest in copies])
    kept, scores, sizes, record_lens = {}, [], [], []  # kept: order -> kept index
    kept_text = {}  # exact key -> the kept index of the one document kept with it (exact dedup)
    near_first = {}  # a first copy dropped as a near duplicate -> the kept index it matched
    removed, removed_training = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
    example_orders, cluster_sizes, pair_examples = collections.defaultdict(list), collections.Counter(), []
    for order, is_first, rest in events:
        if is_first:
            score, key, (n_bytes, size, record_len) = rest
            matches = [kept[i] for i in near_of.get(order, ()) if i in kept]
            if key in kept_text:  # key None (no exact dedup) is never there
                first, rule = kept_text[key], "exact_dup"
            elif not matches:
                kept[order] = len(scores)
                if key is not None:
                    kept_text[key] = len(scores)
                scores.append(score)
                sizes.append(size)
                record_lens.append(record_len)
                continue
            else:
                first, rule = near_first.setdefault(order, min(matches)), "near_dup"
        else:  # the same key and signature as an earlier first: the index's answer for it
            of, score, n_bytes, key = rest
            if key in kept_text:
                first, rule = kept_text[key], "exact_dup"
            else:
                first, rule = near_first[of], "near_dup"
        if scores[first] < 0 <= score:
            rule = "contamination"
        if rule == "near_dup":
            cluster_sizes[first] += 1
            if len(pair_examples) < local.EXAMPLES_PER_RULE:
                pair_examples.append((first, order))
        for counts in (removed, removed_training) if score >= 0 else (removed,):
            counts[rule][0] += 1
            counts[rule][1] += n_bytes
        if len(example_orders[rule]) < local.EXAMPLES_PER_RULE:
            example_orders[rule].append(order)
    shard_of = list(zip(kept, runner.shard_indices(record_lens, shard_bytes)))  # kept: in order
    summary = {
        "scores": np.asarray(scores, np.float64),
        "sizes": np.asarray(sizes, np.int64).reshape(-1, 2),
        "shards": shard_of[-1][1] + 1 if shard_of else 0,
        "removed": dict(removed),
        "removed_training": dict(removed_training),
        "example_orders": dict(example_orders),
        "clusters": {
            "clusters": len(cluster_sizes),
            "largest": max(cluster_sizes.values(), default=-1) + 1,
            "examples": pair_examples,
        },
    }
    return summary, shard_of


def _example_orders(summary: dict) -> set:
    return {o for orders in summary["example_orders"].values() for o in orders} | {
        o for _, o in summary["clusters"]["examples"]
    }


def _pick(kv, wanted: set):
    if kv[0] in wanted:
        yield kv[0], (kv[1][6], kv[1][7])


def _write_shard(group, out_dir: Path) -> None:
    shard, records = group
    write_document_shard(out_dir / shard_name("documents", shard, ".array_record"), (r for _, r in sorted(records)))


class _Tally(beam.CombineFn):
    """Per rule: (documents, bytes, training documents, training bytes, the first few (source, head))."""

    def create_accumulator(self):
        return [0, 0, 0, 0, []]

    def add_input(self, acc, item):
        order, score, n_bytes, source, head = item
        acc[0], acc[1] = acc[0] + 1, acc[1] + n_bytes
        if score >= 0:
            acc[2], acc[3] = acc[2] + 1, acc[3] + n_bytes
        acc[4] = sorted([*acc[4], (order, source, head)])[: local.EXAMPLES_PER_RULE]
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        first = sorted(x for a in accs for x in a[4])[: local.EXAMPLES_PER_RULE]
        return [*(sum(a[k] for a in accs) for k in range(4)), first]

    def extract_output(self, acc):
        return (*acc[:4], [(s, t) for _, s, t in acc[4]])
