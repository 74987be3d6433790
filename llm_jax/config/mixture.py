"""data.mixture entries -> named sources with weights by step (pure Python: checked with the config).

An entry is NAME:WEIGHT[/WEIGHT@STEP ...]=SOURCE[;SOURCE ...], e.g.
    web:0.7/0.5@9000=data/web/*.jsonl.zst     (weight 0.7 from step 1, 0.5 from step 9000 on)
    books:0.3=builtin:shakespeare;more/books
Weights are relative: at every step the parts' current weights are normalised to sum to 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llm_jax.errors import UserError

_NAME = re.compile(r"[a-z0-9_]+")
FORMAT = "NAME:WEIGHT[/WEIGHT@STEP ...]=SOURCE[;SOURCE ...]"


@dataclass(frozen=True)
class MixturePart:
    name: str
    schedule: tuple[tuple[int, float], ...]  # (first step, weight), steps rising from 1
    sources: tuple[str, ...]

    def weight(self, step: int) -> float:
        """The weight in force at `step` (1-based)."""
        return next(w for first, w in reversed(self.schedule) if step >= first)


def parse_mixture(entries: tuple[str, ...]) -> list[MixturePart]:
    parts = [_parse(entry) for entry in entries]
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"data.mixture names a part twice: {', '.join(twice)}")
    for first in sorted({first for p in parts for first, _ in p.schedule}):
        if sum(p.weight(first) for p in parts) == 0:
            raise UserError(f"data.mixture: every weight from step {first} on is 0; keep one part's positive")
    return parts


def _parse(entry: str) -> MixturePart:
    def bad(why: str) -> UserError:
        return UserError(f"data.mixture entry {entry!r}: {why} (the form is {FORMAT})")

    head, sep, sources = entry.partition("=")
    name, sep2, weights = head.partition(":")
    if not sep or not sep2:
        raise bad("no NAME:WEIGHT= before the sources")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise bad(f"name {name!r} must be lowercase letters, digits and _")
    schedule = []
    for i, item in enumerate(weights.split("/")):
        weight, at, step = item.partition("@")
        try:
            value, first = float(weight), int(step) if at else 1
        except ValueError:
            raise bad(f"{item!r} is not WEIGHT or WEIGHT@STEP") from None
        rising = (i == 0) == (first == 1) and (not schedule or first > schedule[-1][0])
        if not math.isfinite(value) or value < 0 or first < 1 or not rising:
            raise bad("weights must be >= 0, the first without @STEP and the others at rising steps > 1")
        schedule.append((first, value))
    listed = tuple(s.strip() for s in sources.split(";") if s.strip())
    if not listed:
        raise bad("no sources after =")
    return MixturePart(name, tuple(schedule), listed)
