"""A weighted mixture of sources (data.mixture, parsed by llm_jax/config/mixture.py) at training time.

Each part's training windows are a grain source of their own, shuffled and repeated on its own (a small
part repeats while a large one is still in its first epoch). Every step draws global_batch rows: the count
from each part is the largest-remainder rounding of what the weights in force owe it, cumulatively since
step 1, so each part's realised share stays within one row of its weight's integral at every step (a
schedule's switch takes effect at the step it names); the rows' order within the step is a seeded
shuffle. Host p of P reads rows p, p + P, ... of each step, as train_iterator does. The iterator's state
is the step and each part's rows taken: `get_state` / `set_state` resume it exactly (the checkpoint
stores it, as it stores a plain iterator's).

Why not grain's own `mix`: its proportions are fixed for the whole stream, and a schedule by step needs
each part to continue where the previous weights left it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import grain
import numpy as np

from llm_jax.config import DataConfig
from llm_jax.config.mixture import MixturePart
from llm_jax.data.corpus import resolve_source
from llm_jax.errors import UserError


def part_finder(parts: list[MixturePart], data: DataConfig) -> Callable[[str], str | None]:
    """A curated document's source (a file, file:line, file:row or tfds:spec:index: data/corpus.py) -> the
    name of the first part that lists it (None: no part does)."""
    owner: dict[str, str] = {}
    for part in parts:
        for source in part.sources:
            files = [source] if source.startswith("tfds:") else map(str, resolve_source(source, data.cache_dir))
            for name in files:
                owner.setdefault(name, part.name)

    def part_of(source: str) -> str | None:  # None: a data.val_sources document (validation of the whole)
        return owner.get(source) or owner.get(source.rsplit(":", 1)[0])

    return part_of


class Mixture:
    """The parts' random-access training sources and their weights; `[0]` is a row (the step's example)."""

    def __init__(self, parts: list[MixturePart], sources: list):
        self.parts, self.sources = parts, sources
        empty = [p.name for p, s in zip(parts, sources) if len(s) == 0]
        if empty:
            raise UserError(
                f"data.mixture part {', '.join(empty)} has no training windows (fewer than model.seq_len + 1 "
                "tokens after curation): add documents to it, or drop it from the mixture"
            )

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, i: int) -> dict:
        return self.sources[0][i]

    def owed(self, steps: int, batch: int) -> np.ndarray:
        """[parts] float64: rows the weights assign each part over steps 1..steps (normalised per step)."""
        changes = sorted({first for p in self.parts for first, _ in p.schedule} | {steps + 1})
        total = np.zeros(len(self.parts))
        for start, end in itertools.pairwise(changes):
            if start > steps:
                break
            w = np.array([p.weight(start) for p in self.parts])
            total += (min(end, steps + 1) - start) * batch * w / w.sum()
        return total


def allocate(owed: np.ndarray, done: np.ndarray, rows: int) -> np.ndarray:
    """[parts] int64 rows for the next step: what each part is owed beyond `done`, rounded by largest
    remainder to sum to `rows` (a part already ahead gets none)."""
    want = np.maximum(owed - done, 0.0)
    want = want * rows / want.sum()
    counts = np.floor(want).astype(np.int64)
    extra = np.argsort(-(want - counts), kind="stable")[: rows - counts.sum()]
    counts[extra] += 1
    return counts


class MixtureIterator(grain.DatasetIterator):
    """Batches {name: [global_batch / process_count, ...]} of the mixture (module docstring)."""

    def __init__(self, mixture: Mixture, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        super().__init__()
        self.mixture, self.batch, self.seed = mixture, global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self._parts = [
            grain.MapDataset.source(s).shuffle(seed=seed + 1 + i).repeat() for i, s in enumerate(mixture.sources)
        ]
        self.step, self.done = 0, np.zeros(len(mixture.parts), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        step = self.step + 1
        counts = allocate(self.mixture.owed(step, self.batch), self.done, self.batch)
        labels = np.repeat(np.arange(len(counts)), counts)
        np.random.default_rng([self.seed, step]).shuffle(labels)
        positions = np.empty(self.batch, np.int64)
        for part, n in enumerate(counts):
            positions[labels == part] = self.done[part] + np.arange(n)
        mine = range(self.process_index, self.batch, self.process_count)
        rows = [self._parts[labels[j]][int(positions[j])] for j in mine]
        self.step, self.done = step, self.done + counts
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def shares(self) -> dict[str, float]:
        """Each part's share of the rows drawn so far."""
        total = max(int(self.done.sum()), 1)
        return {p.name: int(n) / total for p, n in zip(self.mixture.parts, self.done)}

    def get_state(self) -> dict:
        return {"step": self.step, "done": self.done.tolist()}

    def set_state(self, state: dict) -> None:
        if len(state["done"]) != len(self.mixture.parts):
            raise UserError(
                f"the checkpoint's data iterator has {len(state['done'])} mixture parts, data.mixture "
                f"{len(self.mixture.parts)}: resume with the mixture it was saved with"
            )
        self.step, self.done = int(state["step"]), np.asarray(state["done"], np.int64)
