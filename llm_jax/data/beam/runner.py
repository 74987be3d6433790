"""Running one of this package's pipelines: its options (data.beam_options, else Beam's FnApiRunner in
multi-process mode with data.workers processes), its workers' log kept in a file instead of the
terminal, a failure as one line naming that file, and the small results it leaves for the driver."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from array_record.python.array_record_module import ArrayRecordReader

from llm_jax.config import DataConfig
from llm_jax.data.progress import rate_line, ticker
from llm_jax.errors import UserError


def options(d: DataConfig) -> list[str]:
    """The FnApiRunner by name: Beam's DirectRunner (2.78) first tries Prism, a binary it downloads from GitHub,
    so online a pipeline would run on another runner than offline (where it falls back to this one)."""
    return list(d.beam_options) or [
        "--runner=FnApiRunner",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={d.workers or os.cpu_count() or 1}",
    ]


def scratch_dir(path: Path) -> Path:
    """An empty directory for a pipeline's results and log (removed by run() when it succeeds)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run(d: DataConfig, scratch: Path, build: Callable[[beam.Pipeline], None], what: str, stage: str, log) -> None:
    """build(pipeline) adds the stages; they run when it returns (in this thread: cluster runners install
    signal handlers), while a reporter thread prints a line at most every data.progress_s seconds from the
    workers' Counters (`stage: MB done, MB/s; documents`). Results saved with save() are read with load()
    before the scratch directory is removed with done()."""
    log(f"{what} on Apache Beam ({' '.join(options(d))}) ...")
    beam_log, counters = scratch / "beam.log", scratch / "progress"
    counters.mkdir(exist_ok=True)
    finished, began, due = threading.Event(), time.perf_counter(), ticker(d.progress_s)

    def report() -> None:
        while not finished.wait(timeout=min(max(d.progress_s, 0.2), 5.0)):
            if due() and (done := _totals(counters))[1]:
                log(rate_line(stage, done[0], began, f"{done[1]:,} documents"))

    reporter = threading.Thread(target=report, daemon=True)
    try:
        with _stderr_to(beam_log):
            reporter.start()
            try:
                with beam.Pipeline(options=PipelineOptions(options(d))) as p:
                    build(p)
            finally:
                finished.set()
                reporter.join()
    except Exception as e:  # a worker's traceback is in the log; one line here
        fd, kept = tempfile.mkstemp(prefix="llm_jax-beam-", suffix=".log")  # outlives a cleaned-up build
        os.close(fd)
        shutil.copyfile(beam_log, kept)
        raise UserError(f"the Beam pipeline ({what}) failed: {_error_line(e)}; its log: {kept}") from None


def _error_line(e: Exception) -> str:
    """The line of a (runner-wrapped, multi-line) exception that names the error, at most 400 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    line = (named or lines)[-1]
    return line if len(line) <= 400 else line[:400] + "..."


class Counter:
    """A DoFn's running totals (bytes, documents) for the driver's progress lines: a file of its own under
    the scratch directory, rewritten at most once a second and at the end of each bundle."""

    def __init__(self, scratch: Path):
        self.folder = scratch / "progress"

    def start(self) -> None:  # in DoFn.setup
        self.path, self.bytes, self.items, self.due = self.folder / uuid.uuid4().hex, 0, 0, ticker(1.0)

    def add(self, n_bytes: int) -> None:
        self.bytes, self.items = self.bytes + n_bytes, self.items + 1
        if self.due():
            self.flush()

    def flush(self) -> None:  # in DoFn.finish_bundle
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.bytes} {self.items}")
        os.replace(tmp, self.path)


def _totals(folder: Path) -> tuple[int, int]:
    totals = [0, 0]
    for path in folder.glob("*[!p]"):  # not the .tmp files
        try:
            for k, value in enumerate(path.read_text().split()):
                totals[k] += int(value)
        except (OSError, ValueError):  # replaced while read: counted next time
            continue
    return totals[0], totals[1]


def done(scratch: Path) -> None:
    """The scratch directory removed, and any temporary shard a killed or retried task left beside the output
    (a shard is written under <name>.<attempt>.tmp and renamed when whole)."""
    for tmp in scratch.parent.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    shutil.rmtree(scratch)


# pickle, for a pipeline's own results only: written into its scratch directory by this run's workers and read
# back by the host that launched them, the way Beam itself moves every element and DoFn between them. Nothing a
# user hands llm_jax is unpickled (datasets are JSON, ArrayRecord and raw token files).
def save(value, path: Path) -> None:
    path.write_bytes(pickle.dumps(value))


def load(scratch: Path, name: str):
    return pickle.loads((scratch / f"{name}.pkl").read_bytes())


def saved(pcoll, scratch: Path, name: str) -> None:
    """A one-element PCollection pickled to scratch/<name>.pkl."""
    pcoll | f"save {name}" >> beam.Map(save, scratch / f"{name}.pkl")


def document_tasks(paths: list[Path], per_task: int = 1024) -> list[tuple[int, str, int, int]]:
    """Document shards cut into tasks: (kept index of the first, shard, first record, end record)."""
    tasks, start = [], 0
    for path in paths:
        reader = ArrayRecordReader(str(path))
        try:
            n = reader.num_records()
        finally:
            reader.close()
        tasks += [(start + a, str(path), a, min(a + per_task, n)) for a in range(0, n, per_task)]
        start += n
    return tasks


def shard_indices(sizes: Iterable[int], max_bytes: int) -> Iterator[int]:
    """The shard of each record of these sizes written in order, as shards.py's writers rotate: a shard
    closes once it holds max_bytes or more."""
    shard, filled = 0, 0
    for size in sizes:
        yield shard
        filled += size
        if filled >= max_bytes:
            shard, filled = shard + 1, 0


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 appended to path (worker processes inherit it), restored after."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
