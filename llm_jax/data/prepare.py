"""Pretraining data: sources -> curated document shards -> tokenizer -> packed token shards
(train / val; with data.mixture, per part) + report, in a data directory (a run's data/), built once
and reused.

Everything is written under <data dir>.partial and renamed when whole, so an interrupted build
leaves no half-written dataset: rerunning rebuilds it, byte for byte the same for the same config
and seed (timings live in report.json only).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llm_jax.config import Config
from llm_jax.config.mixture import MixturePart, parse_mixture
from llm_jax.data.contamination import NGRAM, leaks, reference_ngrams, task_texts
from llm_jax.data.curate import Curated, curate
from llm_jax.data.loader import PreparedData
from llm_jax.data.mixture import Mixture, part_finder
from llm_jax.data.progress import rate_line, ticker
from llm_jax.data.report import write_report
from llm_jax.data.shards import (
    Packed,
    Routes,
    TokenShards,
    TokenWriter,
    documents_at,
    read_documents,
    read_meta,
    stream_prefix,
    token_dtype,
    write_meta,
)
from llm_jax.data.tokenizer import BaseTokenizer, copy_tokenizer, load_tokenizer, train_tokenizer
from llm_jax.errors import UserError

_ENCODE_BYTES = 4 << 20  # text per sentencepiece batch call (encoded on all cores)


def prepare_text(
    cfg: Config, data_dir: Path, tokenizer_path: Path, log=print, shards_at: str | None = None
) -> PreparedData:
    """The packed token shards in data_dir (built if absent) and the tokenizer at tokenizer_path
    (data.tokenizer copied there, or trained on the training split when there is none yet). shards_at: where
    the shards named by data_dir/meta.json are read instead (a gs:// dataset's data/, read in place)."""
    meta = read_meta(data_dir / "meta.json")
    if meta is None or "shards" not in meta:  # none yet, or data without token shards: rebuilt
        meta = _build(cfg, data_dir, tokenizer_path, log)
    tokenizer = load_tokenizer(tokenizer_path.parent)  # the run's: tokenizer.json first, else .model

    def windows(names: list[str]) -> TokenShards:
        paths = [f"{shards_at}/{name}" if shards_at else data_dir / name for name in names]
        return TokenShards(paths, meta["dtype"], cfg.model.seq_len, tokenizer.eos_id)

    train, val = windows(meta["shards"]["train"]), windows(meta["shards"]["val"])
    if "mixture" not in meta:
        if cfg.data.mixture:
            raise UserError(
                f"{data_dir} was built without data.mixture, so it has no parts to weigh: prepare the data with "
                "the mixture (llm-jax data prepare ... data.mixture=[...]), or drop data.mixture"
            )
        return PreparedData(tokenizer, train, val, meta)
    built = meta["mixture"]  # the run's data.mixture may reweigh the parts (data.prepared), not rename them
    parts = parse_mixture(cfg.data.mixture) or [
        MixturePart(name, tuple(map(tuple, part["schedule"])), ()) for name, part in built.items()
    ]
    if sorted(p.name for p in parts) != sorted(built):
        raise UserError(
            f"data.mixture names the parts {', '.join(p.name for p in parts)}; the data was built with "
            f"{', '.join(built)}: keep their names (weights may change)"
        )
    train = Mixture(parts, [windows(built[p.name]["shards"]["train"]) for p in parts])
    by_part = {p.name: windows(built[p.name]["shards"]["val"]) for p in parts}
    return PreparedData(tokenizer, train, val, meta, {name: v for name, v in by_part.items() if len(v)})


def val_threshold(scores: np.ndarray, val_fraction: float, val_sources: bool) -> float:
    """Documents with score <= the threshold are validation: data.val_sources (score -1), else the
    groups hashed below val_fraction, at least one group on each side."""
    if val_sources:
        if not (scores < 0).any():
            raise UserError("curation removed every data.val_sources document; see the report, or relax curate")
        return 0.0
    groups = np.unique(scores)
    if len(groups) < 2:
        raise UserError(
            f"need at least 2 documents (groups) after curation to hold one out for validation, "
            f"found {len(groups)}: add files, use .jsonl with one document per line, or set data.val_sources"
        )
    n_val = int(np.clip((groups < val_fraction).sum(), 1, len(groups) - 1))
    return float(groups[n_val - 1])


def _build(cfg: Config, data_dir: Path, tokenizer_path: Path, log) -> dict:
    partial = data_dir.with_name(data_dir.name + ".partial")
    for stale in (partial, data_dir):  # an interrupted build, or a directory without a whole dataset
        shutil.rmtree(stale, ignore_errors=True)
    parts = parse_mixture(cfg.data.mixture)
    if parts:  # the parts' sources curated together (dedup across parts), then tokenized per part
        union = tuple(dict.fromkeys(s for p in parts for s in p.sources))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=union))
    log(f"curating {', '.join(cfg.data.val_sources + cfg.data.sources)} ...")
    if cfg.data.engine == "beam":
        from llm_jax.data.beam.curate import curate_beam  # the llm_jax[beam] extra, imported only when used

        cur = curate_beam(cfg, partial / "documents", log)
    else:
        cur = curate(cfg, partial / "documents", log)
    is_val = cur.scores <= val_threshold(cur.scores, cfg.data.val_fraction, bool(cfg.data.val_sources))
    leaked, contamination = _leaks(cfg, cur, is_val, log)
    splits = {"train": ~is_val & ~leaked, "val": is_val}  # documents of each split (leaked: in neither)

    tokenizer = _tokenizer(cfg, tokenizer_path, cur, is_val | leaked, log)  # trained on what trains
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} pieces, more than "
            f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size} (or more)"
        )
    dtype = token_dtype(cfg.model.vocab_size)
    part_of = part_finder(parts, cfg.data) if parts else lambda source: None

    route = Routes(is_val, leaked, part_of)
    keys = [(split, name) for split in ("train", "val") for name in [p.name for p in parts] + [None]]
    if cfg.data.engine == "beam":
        from llm_jax.data.beam.pack import pack_beam

        packed = pack_beam(cfg, cur, tokenizer.path, dtype, keys, route, partial, log)
    else:
        packed = _pack(cfg, cur, tokenizer, dtype, keys, route, partial, log)
    _name_kept(cur)
    closed, doc_tokens = packed.shards, packed.doc_tokens
    shards = {split: [n for (s, _), files in closed.items() if s == split for n in files] for split in ("train", "val")}
    tokens = {split: sum(n for (s, _), n in packed.tokens.items() if s == split) for split in ("train", "val")}
    for split in ("train", "val"):
        if tokens[split] < cfg.model.seq_len + 1:
            raise UserError(
                f"the {split} split holds {tokens[split]} tokens, fewer than model.seq_len + 1 = "
                f"{cfg.model.seq_len + 1}: add documents, raise data.val_fraction or lower model.seq_len"
            )

    meta = {
        "dtype": dtype.name,
        "shards": shards,
        "documents": {"read": cur.read.documents, "kept": len(cur.scores), "val": int(is_val.sum())},
        **{
            f"{split}_{unit}": int(value)
            for split, mask in splits.items()
            for unit, value in (("bytes", cur.sizes[mask, 0].sum()), ("tokens", tokens[split]))
        },
    }
    if parts:
        meta["mixture"] = {
            p.name: {
                "schedule": [list(x) for x in p.schedule],
                "shards": {split: closed[split, p.name] for split in ("train", "val")},
                **{f"{split}_tokens": packed.tokens[split, p.name] for split in ("train", "val")},
            }
            for p in parts
        }
        log("mixture: " + ", ".join(f"{n} {m['train_tokens']:,} train tokens" for n, m in meta["mixture"].items()))
    report = write_report(partial, cfg, cur, splits, doc_tokens, contamination, meta, packed.seconds, log)
    meta["report"] = {"removed": {rule: n for rule, (n, _) in report["removed"].items()}}
    write_meta(partial / "meta.json", meta)
    partial.rename(data_dir)  # the dataset appears whole or not at all
    return meta


def _tokenizer(cfg: Config, path: Path, cur: Curated, held_out: np.ndarray, log) -> BaseTokenizer:
    if cfg.data.tokenizer:
        copy_tokenizer(cfg.data.tokenizer, path.parent)  # the run directory is self-contained
        return load_tokenizer(path.parent)
    if not path.is_file():
        train_bytes = int(cur.sizes[~held_out, 0].sum())
        sample = min(train_bytes, cfg.data.tokenizer_sample_bytes)
        log(f"tokenizer: training a {cfg.model.vocab_size}-piece BPE model on {sample / 1e6:,.1f} MB of text ...")
        texts = (r["text"] for r, out in zip(read_documents(cur.paths), held_out) if not out)
        tokenizer = train_tokenizer(
            texts,
            cfg.model.vocab_size,
            path.with_suffix(""),
            cfg.data.tokenizer_sample_bytes,
            cfg.seed,
            train_bytes,
        )
        log(f"tokenizer: trained a {tokenizer.vocab_size}-piece BPE model -> {path}")
    return load_tokenizer(path)


def _pack(
    cfg: Config, cur: Curated, tokenizer: BaseTokenizer, dtype, keys: list, route: Routes, out: Path, log
) -> Packed:
    """The kept documents tokenized (sentencepiece on all cores) and appended to their streams' token shards."""
    began, shard_bytes = time.perf_counter(), int(cfg.data.shard_mb * 2**20)
    writers = {key: TokenWriter(out, stream_prefix(key), dtype, tokenizer.eos_id, shard_bytes) for key in keys}
    doc_tokens = np.zeros(len(cur.scores), np.int64)
    progress_due, done, total = ticker(cfg.data.progress_s), 0, max(int(cur.sizes[:, 0].sum()), 1)
    for start, records in _chunks(read_documents(cur.paths)):
        if progress_due():
            details = f"{start:,} of {len(cur.scores):,} documents, {done / total:.0%}"
            log(rate_line("tokenizing", done, began, details))
        done += int(cur.sizes[start : start + len(records), 0].sum())
        for i, (record, ids) in enumerate(
            zip(records, tokenizer.encode_batch([r["text"] for r in records])), start=start
        ):
            if (key := route(i, record["source"])) is not None:
                writers[key].add(ids)
            doc_tokens[i] = len(ids)
    shards = {key: [p.name for p in w.close()] for key, w in writers.items()}
    return Packed(shards, {k: w.tokens for k, w in writers.items()}, doc_tokens, time.perf_counter() - began)


def _name_kept(cur: Curated) -> None:
    """The near-duplicate cluster examples' kept documents, an index until here, named by their source."""
    wanted = sorted({pair["kept"] for pair in cur.clusters["examples"]})
    sources = dict(zip(wanted, (r["source"] for r in documents_at(cur.paths, wanted))))
    for pair in cur.clusters["examples"]:
        pair["kept"] = sources[pair["kept"]]


def _chunks(records: Iterator[dict]) -> Iterator[tuple[int, list[dict]]]:
    """(index of the first, records) batches of about _ENCODE_BYTES of text."""
    batch, size, start = [], 0, 0
    for record in records:
        batch.append(record)
        size += len(record["text"])
        if size >= _ENCODE_BYTES:
            yield start, batch
            start, batch, size = start + len(batch), [], 0
    if batch:
        yield start, batch


def _leaks(cfg: Config, cur: Curated, is_val: np.ndarray, log) -> tuple[np.ndarray, dict]:
    """The contamination gate (data/contamination.py): a bool per kept document (a training document sharing
    a 13-gram with the validation split or a data.decontaminate task) and the report's entry."""
    val = (r["text"] for r in documents_at(cur.paths, np.flatnonzero(is_val).tolist()))  # read only those
    references = {"validation": reference_ngrams(val)}
    for spec in cfg.data.decontaminate:
        references |= {f"task:{name}": reference_ngrams(texts) for name, texts in task_texts(spec).items()}
    if cfg.data.engine == "beam":
        from llm_jax.data.beam.gate import gate_beam

        leaked, report = gate_beam(cfg, cur, is_val, references, log)
    else:
        train = ((r["text"], r["source"]) for r, val in zip(read_documents(cur.paths), is_val) if not val)
        hit, report = leaks(references, train)
        leaked = np.zeros(len(is_val), bool)
        leaked[~is_val] = hit
    return leaked, {"ngram": NGRAM, "removed_train_documents": int(leaked.sum()), "references": report}
