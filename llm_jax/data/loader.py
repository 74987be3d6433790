"""grain pipelines over packed token windows: a seeded, endlessly repeated, per-host shard of the
training windows (reshuffled every epoch), and a fixed, evenly spread subset of the validation windows."""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from llm_jax.data.packing import TokenWindows
from llm_jax.errors import UserError

# Windows are memory-mapped and a batch is a few KB: reading them in the training thread is cheaper
# than handing them over from worker threads (grain's advice for in-memory sources).
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def train_iterator(source: TokenWindows, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches [global_batch / process_count, seq_len + 1] of this host's rows of each global batch.

    Host p reads global rows p, p + P, p + 2P, ... of the shuffled stream, so the hosts together see
    exactly the stream one host would see. `get_state()` / `set_state()` resume it exactly.
    """
    if global_batch % process_count:
        raise UserError(f"train.batch_size={global_batch} must be divisible by the {process_count} hosts")
    if len(source) < global_batch:
        raise UserError(f"the training split has {len(source)} windows of {source.seq_len + 1} tokens, fewer than "
                        f"train.batch_size={global_batch}: add text, or lower train.batch_size or model.seq_len")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
    return iter(ds.to_iter_dataset(_READ))


def eval_batches(source: TokenWindows, batch: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """min(len, batch * max_batches) validation windows spread evenly over the split (every
    len // n-th window, so a subset still samples every held-out document), in order, as this
    host's rows. The last batch is padded with weight-0 rows, so every chosen window counts once.
    """
    if len(source) == 0:
        raise UserError(f"the validation split has fewer than model.seq_len + 1 = {source.seq_len + 1} tokens: "
                        "raise data.val_fraction or add documents")
    n = min(len(source), batch * max_batches)
    stride = len(source) // n
    per_host = batch // process_count
    for start in range(0, n, batch):
        rows = range(start + process_index, start + batch, process_count)
        tokens = np.stack([source[i * stride] if i < n else np.zeros(source.seq_len + 1, np.int32) for i in rows])
        weights = np.asarray([[1.0 if i < n else 0.0] for i in rows], np.float32)
        yield {"tokens": tokens, "weights": np.broadcast_to(weights, (per_host, source.seq_len)).copy()}
