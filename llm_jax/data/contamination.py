"""The contamination gate: 13-gram overlap between the training documents and the text a model is
judged on (the validation split, and eval task files named in data.decontaminate), as GPT-3 and
lm-eval's decontamination measure it.

Words are the exact-dedup normalisation's (lowercased, Unicode punctuation and symbols removed); an
n-gram is 13 consecutive words hashed to 64 bits (dedup.ngram_hashes: a false match among 10M reference
n-grams and 1G training n-grams is expected about once in 2,000 corpora). A training document sharing any
13-gram with a reference is removed from training and counted against that reference in the report.
Dedup cannot see these leaks: a question copied into a long web page is far below any near-copy threshold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llm_jax.data.dedup import ngram_hashes
from llm_jax.errors import UserError

NGRAM = 13
BUNDLED_TASKS = Path(__file__).resolve().parents[1] / "evals" / "tasks"  # `bundled` in data.decontaminate
EXAMPLES = 3


def task_texts(spec: str) -> dict[str, list[str]]:
    """data.decontaminate entry -> {task name: texts}: `bundled` (the eval tasks shipped in llm_jax/evals/tasks),
    a .jsonl file (every string of a row, and strings in its lists, joined: context and choices), or a .txt."""
    paths = sorted(BUNDLED_TASKS.glob("*.jsonl")) if spec == "bundled" else [Path(spec).expanduser()]
    out = {}
    for path in paths:
        if not path.is_file():
            raise UserError(f"data.decontaminate: {path} not found (eval task .jsonl / .txt files, or 'bundled')")
        if path.suffix == ".txt":
            out[path.stem] = [path.read_text(errors="replace")]
            continue
        texts = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"data.decontaminate: {path}:{number} is not a JSON object") from None
                texts.append(" ".join(_strings(row)))
        out[path.stem] = texts
    return out


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def reference_ngrams(texts: Iterable[str]) -> np.ndarray:
    """Sorted unique 64-bit hashes of the texts' 13-grams."""
    parts = [ngram_hashes(t, NGRAM) for t in texts]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def leaks(references: dict[str, np.ndarray], train: Iterable[tuple[str, str]]) -> tuple[np.ndarray, dict]:
    """train: (text, source) of every training document -> (a bool per document: shares a 13-gram with a
    reference, the report: per reference its n-grams, the training documents hit and examples of them)."""
    found, n = [], 0
    for n, (text, source) in enumerate(train, start=1):
        if names := hits(text, references):
            found.append((n - 1, names, source))
    return tally(references, found, n)


def hits(text: str, references: dict[str, np.ndarray]) -> list[str]:
    """The references (sorted n-gram hashes) that share a 13-gram with the text."""
    grams = ngram_hashes(text, NGRAM)
    return [name for name, ref in references.items() if len(grams) and len(ref) and _any_in(grams, ref)]


def tally(references: dict[str, np.ndarray], found: Iterable[tuple[int, list[str], str]], n: int):
    """(a bool per training document, the report) from (position among the n, references hit, source) of the
    documents hit, in order."""
    report = {name: {"ngrams": len(ref), "train_documents_hit": 0, "examples": []} for name, ref in references.items()}
    hit = np.zeros(n, bool)
    for position, names, source in found:
        hit[position] = True
        for name in names:
            entry = report[name]
            entry["train_documents_hit"] += 1
            if len(entry["examples"]) < EXAMPLES:
                entry["examples"].append(source)
    return hit, report


def _any_in(values: np.ndarray, sorted_ref: np.ndarray) -> bool:
    at = np.minimum(np.searchsorted(sorted_ref, values), len(sorted_ref) - 1)
    return bool(np.any(sorted_ref[at] == values))
