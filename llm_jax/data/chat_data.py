"""Chat (SFT) and preference (DPO) JSONL -> fixed-shape example arrays in the run directory.

- sft: rows {"messages": [{"role", "content"}, ...]} are rendered with the chat template
  (llm_jax/data/chat_template.py: weight 1 on assistant text and its end of turn) and packed in file order into
  rows of seq_len + 1 tokens with segment ids, so attention never crosses examples and positions
  restart at each example. Arrays: tokens [R, L+1], segments [R, L+1], weights [R, L] (per target).
- dpo: rows {"prompt": text | "messages": [...], "chosen": text, "rejected": text} become a pair of
  sequences (prompt + response), padded to the longest sequence in the data (at most seq_len + 1);
  weights 1 on the response and its end of turn only. Arrays: tokens [N, 2, P+1], weights [N, 2, P].

An example longer than seq_len + 1 tokens keeps its first seq_len + 1 (fit_example) and is
counted as truncated; one left with no response token is dropped and counted. Bad rows (malformed
JSON, unknown role or missing field, empty response, chosen == rejected) stop the run naming
file:line with data.bad_rows=strict, or are skipped and counted with skip.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np

from llm_jax.config import Config
from llm_jax.data.chat_template import check_chat, check_messages, fit_example, render, reply_example
from llm_jax.data.corpus import resolve_source
from llm_jax.data.loader import PreparedData
from llm_jax.data.shards import read_meta, write_meta
from llm_jax.data.tokenizer import BaseTokenizer as Tokenizer
from llm_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from llm_jax.errors import UserError

Example = tuple  # sft: (ids, weights); dpo: ((ids, weights) chosen, (ids, weights) rejected)


class _BadRow(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _response(value, where: str, name: str) -> str:
    """A response given as text or as one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if not isinstance(value, str):
        raise _BadRow("invalid row", f"{where}: {name!r} must be the response text")
    if not value.strip():
        raise _BadRow("empty response", f"{where}: {name!r} is empty")
    return value


def _messages(value, where: str) -> list:
    try:
        check_messages(value, where)
    except UserError as e:
        raise _BadRow("invalid row", str(e)) from None
    return value


def sft_example(tokenizer: Tokenizer, row: dict, where: str) -> Example:
    messages = _messages(row.get("messages"), where)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise _BadRow("invalid row", f"{where}: no assistant message, so nothing to learn")
    if not all(a.strip() for a in answers):
        raise _BadRow("empty response", f"{where}: an assistant message is empty")
    return render(tokenizer, messages)


def dpo_example(tokenizer: Tokenizer, row: dict, where: str) -> Example:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    elif "messages" in row:
        messages = _messages(row["messages"], where)
    else:
        raise _BadRow("invalid row", f"{where}: needs a non-empty 'prompt' text or a 'messages' list")
    chosen, rejected = _response(row.get("chosen"), where, "chosen"), _response(row.get("rejected"), where, "rejected")
    if chosen.strip() == rejected.strip():
        raise _BadRow("chosen equals rejected", f"{where}: chosen and rejected are the same text")
    return tuple(reply_example(tokenizer, messages, text) for text in (chosen, rejected))


def load_examples(
    sources, kind: str, tokenizer: Tokenizer, length: int, bad_rows: str, cache_dir: str
) -> tuple[list[Example], Counter]:
    """Every usable example of the JSONL sources (kind: sft or dpo), fitted to `length` tokens, and the counts."""
    make = sft_example if kind == "sft" else dpo_example
    counts, examples = Counter(), []
    for source in sources:
        for path in resolve_source(source, cache_dir):
            if path.suffix != ".jsonl":
                raise UserError(f"{path}: {kind} data must be .jsonl (one JSON object per line)")
            for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
                if not line.strip():
                    continue
                counts["lines"] += 1
                where = f"{path}:{lineno}"
                try:
                    try:
                        row = json.loads(line.decode("utf-8", errors="replace"))
                    except json.JSONDecodeError as e:
                        raise _BadRow("malformed JSON", f"{where}: malformed JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise _BadRow("invalid row", f"{where}: expected a JSON object")
                    try:
                        example = make(tokenizer, row, where)
                    except (RuntimeError, UnicodeError):  # e.g. a lone surrogate escape, "\ud800"
                        raise _BadRow("invalid row", f"{where}: text that is not valid Unicode") from None
                except _BadRow as e:
                    if bad_rows == "strict":
                        raise UserError(
                            f"{e}; fix that line, or set data.bad_rows=skip to drop and count such rows"
                        ) from None
                    counts[f"skipped: {e.kind}"] += 1
                    continue
                parts = [example] if kind == "sft" else list(example)
                fitted = [fit_example(ids, w, length) for ids, w in parts]
                if any(f is None for f in fitted):
                    counts["dropped: no response token within the context"] += 1
                    continue
                if any(len(ids) > length for ids, _ in parts):
                    counts["truncated to the context"] += 1
                examples.append(fitted[0] if kind == "sft" else tuple(fitted))
    counts["examples"] = len(examples)
    return examples, counts


def pack_sft(examples: list[Example], length: int) -> dict[str, np.ndarray]:
    """Examples -> rows of `length` tokens, filled in order; an example that does not fit the
    current row starts the next. Padding has segment 0 and weight 0."""
    rows, row = [], []
    for ex in examples:
        if sum(len(ids) for ids, _ in row) + len(ex[0]) > length:
            rows.append(row)
            row = []
        row.append(ex)
    if row:
        rows.append(row)
    tokens = np.zeros((len(rows), length), np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    weights = np.zeros((len(rows), length), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, w) in enumerate(row, start=1):
            tokens[r, at : at + len(ids)], segments[r, at : at + len(ids)], weights[r, at : at + len(ids)] = ids, k, w
            at += len(ids)
    return {"tokens": tokens, "segments": segments, "weights": weights[:, 1:]}  # weights of targets tokens[:, 1:]


def pad_dpo(examples: list[Example], length: int) -> dict[str, np.ndarray]:
    """Pairs -> tokens [N, 2, length], weights [N, 2, length - 1] (per target), zero-padded."""
    tokens = np.zeros((len(examples), 2, length), np.int32)
    weights = np.zeros((len(examples), 2, length), np.float32)
    for i, pair in enumerate(examples):
        for j, (ids, w) in enumerate(pair):
            tokens[i, j, : len(ids)], weights[i, j, : len(ids)] = ids, w
    return {"tokens": tokens, "weights": weights[:, :, 1:]}


class ExampleRows:
    """A grain random-access source over the arrays of one split: item i is {name: row i}."""

    def __init__(self, data_dir: Path, split: str):
        self.paths = {p.name.split(".")[1]: p for p in sorted(Path(data_dir).glob(f"{split}.*.npy"))}
        self._arrays = None  # memory-mapped lazily, so the source pickles cheaply
        self._len = len(np.load(self.paths["tokens"], mmap_mode="r"))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(p, mmap_mode="r") for k, p in self.paths.items()}
        return {k: np.asarray(a[int(i)]) for k, a in self._arrays.items()}

    def __repr__(self) -> str:
        return f"ExampleRows({sorted(self.paths.values())[0].parent}, {sorted(self.paths)})"


def save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def prepare_chat(
    cfg: Config, kind: str, data_dir: Path, tokenizer_source: Path, tokenizer_path: Path, log=print
) -> PreparedData:
    """Builds (once) and opens the `kind` (sft or dpo) example arrays in data_dir; see the module
    docstring. The tokenizer is copied from tokenizer_source to tokenizer_path (so the run directory
    is self-contained), and must hold the chat tokens."""
    meta = read_meta(data_dir / "meta.json")
    if meta is None:
        meta = _build(cfg, kind, data_dir, _tokenizer(cfg, tokenizer_source, tokenizer_path), log)
    return PreparedData(
        load_tokenizer(tokenizer_path.parent), ExampleRows(data_dir, "train"), ExampleRows(data_dir, "val"), meta
    )


def _tokenizer(cfg: Config, source: Path, path: Path) -> Tokenizer:
    tokenizer = load_tokenizer(source)
    check_chat(tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {source} has {tokenizer.vocab_size} pieces, more than model.vocab_size={cfg.model.vocab_size}"
        )
    copy_tokenizer(source, path.parent)
    return load_tokenizer(path.parent)


def _build(cfg: Config, kind: str, data_dir: Path, tokenizer: Tokenizer, log) -> dict:
    d, length = cfg.data, cfg.model.seq_len + 1
    train, counts = load_examples(d.sources, kind, tokenizer, length, d.bad_rows, d.cache_dir)
    if d.val_sources:
        val, val_counts = load_examples(d.val_sources, kind, tokenizer, length, d.bad_rows, d.cache_dir)
    else:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_val = min(len(train) - 1, max(1, round(d.val_fraction * len(train))))
        held = set(order[:n_val])
        val = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
        val_counts = Counter(examples=len(val))
    for split, examples in (("train", train), ("val", val)):
        if not examples:
            sources, n = (d.sources, counts) if split == "train" else (d.val_sources, val_counts)
            raise UserError(f"no usable {kind} examples in the {split} data {list(sources)} (counts: {dict(n)})")
    if kind == "sft":
        arrays = {"train": pack_sft(train, length), "val": pack_sft(val, length)}
    else:
        longest = max(len(ids) for ex in train + val for ids, _ in ex)
        arrays = {
            "train": pad_dpo(train, min(length, -(-longest // 8) * 8)),
            "val": pad_dpo(val, min(length, -(-longest // 8) * 8)),
        }
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = {"objective": kind, "train_counts": dict(counts), "val_counts": dict(val_counts)}
    for split, named in arrays.items():
        for name, array in named.items():
            save_array(data_dir / f"{split}.{name}.npy", array)
        meta[f"{split}_rows"] = len(named["tokens"])
        meta[f"{split}_trained_tokens"] = int(named["weights"].sum())
        report = ", ".join(f"{v:,} {k}" for k, v in sorted((counts if split == "train" else val_counts).items()))
        fill = (named["tokens"] != 0).mean()
        log(
            f"{kind} {split}: {report} -> {len(named['tokens']):,} rows of {named['tokens'].shape[1:]} tokens "
            f"({100 * fill:.0f}% filled), {meta[f'{split}_trained_tokens']:,} trained tokens"
        )
    write_meta(data_dir / "meta.json", meta)  # written last: its presence means the data is whole
    return meta
