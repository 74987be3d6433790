"""Corpus -> tokenizer -> packed train/val token streams in the run directory (built once, reused)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llm_jax.config import Config
from llm_jax.data.corpus import load_documents, split_documents
from llm_jax.data.packing import TokenWindows, read_meta, token_dtype, write_meta, write_stream
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.errors import UserError


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenWindows
    val: TokenWindows
    meta: dict


def prepare_data(cfg: Config, run_dir: Path, log=print) -> PreparedData:
    """Text for pretraining; chat / preference examples for sft / dpo (llm_jax/data/chat_data.py)."""
    if cfg.train.objective != "pretrain":
        from llm_jax.data.chat_data import prepare_chat

        return prepare_chat(cfg, run_dir, log)
    data_dir = run_dir / "data"
    meta = read_meta(data_dir / "meta.json")
    if meta is None:
        meta = _build(cfg, run_dir, data_dir, log)
    tokenizer = Tokenizer(run_dir / "tokenizer.model")
    windows = {split: TokenWindows(data_dir / f"{split}.bin", meta["dtype"], cfg.model.seq_len)
               for split in ("train", "val")}
    return PreparedData(tokenizer, windows["train"], windows["val"], meta)


def _build(cfg: Config, run_dir: Path, data_dir: Path, log) -> dict:
    docs, stats = load_documents(cfg.data.sources, cfg.data.text_field, cfg.data.cache_dir)
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction, cfg.seed)
    log(f"corpus: {stats.documents} documents, {stats.bytes:,} bytes from {len(stats.files)} files"
        + (f"; {stats.replaced_bytes} invalid UTF-8 sequences replaced by U+FFFD" if stats.replaced_bytes else ""))
    log(f"split: {len(train_docs)} train / {len(val_docs)} val documents (seed {cfg.seed})")

    tok_path = run_dir / "tokenizer.model"
    if cfg.data.tokenizer:
        tokenizer = Tokenizer(cfg.data.tokenizer)
        shutil.copyfile(tokenizer.path, tok_path)  # the run directory is self-contained
    elif not tok_path.is_file():
        tokenizer = train_tokenizer((d.text for d in train_docs), cfg.model.vocab_size, run_dir / "tokenizer",
                                    cfg.data.tokenizer_sample_bytes, cfg.seed)
        log(f"tokenizer: trained a {tokenizer.vocab_size}-piece BPE model -> {tok_path}")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer {cfg.data.tokenizer or tok_path} has {tokenizer.vocab_size} pieces, more than "
                        f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size} (or more)")

    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(cfg.model.vocab_size)
    meta = {"dtype": dtype.name, "documents": stats.documents, "bytes": stats.bytes,
            "replaced_bytes": stats.replaced_bytes, "val_sources": [d.source for d in val_docs]}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        n = write_stream(tokenizer.encode_batch([d.text for d in split_docs]), tokenizer.eos_id,
                         data_dir / f"{split}.bin", dtype)
        n_bytes = sum(len(d.text.encode()) for d in split_docs)
        meta[f"{split}_tokens"], meta[f"{split}_bytes"] = n, n_bytes
        log(f"{split}: {n:,} tokens ({n_bytes / n:.2f} bytes/token) -> {data_dir / f'{split}.bin'}")
    write_meta(data_dir / "meta.json", meta)  # written last: its presence means the data is whole
    return meta
