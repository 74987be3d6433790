"""The contamination gate on Apache Beam (data.engine=beam): prepare.py's 13-gram check of every training
document against the references (the validation split's n-grams and data.decontaminate's tasks, built by
the launching host and handed to the workers as a file), 1,024 documents a task, with its result: the
same documents taken out and the same report (contamination.tally over the hits in document order)."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np

from llm_jax.config import Config
from llm_jax.data.beam import runner
from llm_jax.data.contamination import hits, tally
from llm_jax.data.curate import Curated
from llm_jax.data.shards import documents_in


def gate_beam(cfg: Config, cur: Curated, is_val: np.ndarray, references: dict[str, np.ndarray], log):
    """-> (a bool per kept document: a training document sharing a 13-gram with a reference, the report)."""
    scratch = runner.scratch_dir(cur.paths[0].parent / "gate.partial")
    arrays = scratch / "references.npz"  # read by the workers, not carried inside the pipeline
    np.savez(arrays, is_val=is_val, **{f"ref{k}": ref for k, ref in enumerate(references.values())})
    tasks = runner.document_tasks(cur.paths)

    def build(p):
        found = p | beam.Create(tasks) | beam.Reshuffle() | beam.ParDo(_Check(list(references), arrays, scratch))
        runner.saved(found | beam.combiners.ToList(), scratch, "hits")

    runner.run(cfg.data, scratch, build, f"checking {len(cur.scores):,} documents for 13-gram leaks", "gate", log)
    found = sorted(runner.load(scratch, "hits"))
    runner.done(scratch)
    position = np.cumsum(~is_val) - 1  # a training document's index among the training documents
    hit, report = tally(references, [(position[i], names, source) for i, names, source in found], int((~is_val).sum()))
    leaked = np.zeros(len(is_val), bool)
    leaked[~is_val] = hit
    return leaked, report


class _Check(beam.DoFn):
    """(first index, shard, first record, end) -> (i, references hit, source) of each training document hit."""

    def __init__(self, names: list[str], arrays: Path, scratch: Path):
        self.names, self.arrays, self.counter = names, arrays, runner.Counter(scratch)

    def setup(self):
        with np.load(self.arrays) as a:
            self.is_val = a["is_val"]
            self.references = {name: a[f"ref{k}"] for k, name in enumerate(self.names)}
        self.counter.start()

    def finish_bundle(self):
        self.counter.flush()

    def process(self, task):
        first, path, a, b = task
        for i, record in enumerate(documents_in(path, a, b), first):
            self.counter.add(len(record["text"].encode("utf-8", "surrogatepass")))
            if not self.is_val[i] and (names := hits(record["text"], self.references)):
                yield i, names, record["source"]
