"""Prepared data and the grain pipelines over it.

A prepared dataset is a tokenizer and two random-access sources of rows ({name: array}): packed
token windows for pretraining (llm_jax/data/prepare.py), SFT rows or DPO pairs
(llm_jax/data/chat_data.py). The pipelines: a seeded, endlessly repeated, per-host shard of the
training rows (reshuffled every epoch), read in the training thread or in worker processes, and a
fixed, evenly spread subset of the validation rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from absl import flags

from llm_jax.data.mixture import Mixture, MixtureIterator
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Any  # a random-access source of rows: TokenShards (pretraining) or ExampleRows (sft, dpo)
    val: Any
    meta: dict  # what the data was built from and its counts (<data dir>/meta.json)
    val_parts: dict | None = None  # data.mixture: each part's validation windows (parts with any), by name


# Windows are memory-mapped and a batch is a few KB: reading them in the training thread is cheaper
# than handing them over from worker threads (grain's advice for in-memory sources).
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def train_iterator(
    source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1, workers: int = 0
) -> grain.DatasetIterator:
    """Batches {name: [global_batch / process_count, ...]}: this host's rows of each global batch.

    Host p reads global rows p, p + P, p + 2P, ... of the shuffled stream, so the hosts together see
    exactly the stream one host would see. workers > 0 reads batches in that many processes (with
    prefetch), in the same order. `get_state()` / `set_state()` resume it exactly.
    """
    if global_batch % process_count:
        raise UserError(f"train.batch_size={global_batch} must be divisible by the {process_count} hosts")
    if len(source) < global_batch:
        raise UserError(
            f"the training split has {len(source)} rows ({source!r}), fewer than "
            f"train.batch_size={global_batch}: add data, or lower train.batch_size or model.seq_len"
        )
    if isinstance(source, Mixture):  # data.mixture: rows drawn by the weights (llm_jax/data/mixture.py)
        return MixtureIterator(source, global_batch, seed, process_index, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
    ds = ds.to_iter_dataset(_READ)
    if workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; we are not an absl program
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ds)


def eval_batches(
    source, batch: int, max_batches: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """min(len, batch * max_batches) validation rows spread evenly over the split (every len // n-th
    row, so a subset still samples every held-out document), in order, as this host's rows, with
    per-target `weights` (1 for every target of a pretraining window). The last batch is padded with
    all-zero rows (weight 0), so every chosen row counts once.
    """
    if len(source) == 0:
        raise UserError(
            "the validation split has no rows (fewer than model.seq_len + 1 tokens): "
            "raise data.val_fraction or add documents"
        )
    n = min(len(source), batch * max_batches)
    stride = len(source) // n

    def row(i: int) -> dict[str, np.ndarray]:
        out = dict(source[i])
        if "weights" not in out:
            out["weights"] = np.ones(out["tokens"].shape[-1] - 1, np.float32)
        return out

    blank = {k: np.zeros_like(v) for k, v in row(0).items()}
    for start in range(0, n, batch):
        rows = [row(i * stride) if i < n else blank for i in range(start + process_index, start + batch, process_count)]
        yield {k: np.stack([r[k] for r in rows]) for k in blank}
