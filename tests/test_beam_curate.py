"""data.engine=beam (llm_jax/data/beam/) against the local engine on the same planted corpus: the
same files byte for byte (document and token shards, tokenizer, meta), the same report but its timings,
the same training batches; a strict bad row is one line. Beam runs its FnApiRunner in multi-process
mode with 2 worker processes, as the README's command does."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from test_curate import _corpus, prose

from llm_jax.data.shards import read_documents
from llm_jax.errors import UserError
from llm_jax.train.objectives import prepare_data

pytestmark = pytest.mark.slow
# apache-beam lives in an environment of its own (pyproject.toml's beam extra); make test runs this file there
pytest.importorskip("apache_beam", reason="the beam extra's environment (make venv-beam) runs these")


def _planted(root: Path) -> tuple[Path, Path]:
    """test_curate's corpus plus: a long .txt cut into pieces, an exact copy of a near-dropped document in
    another file, near copies across files, validation documents that training documents copy."""
    planted = _corpus(root / "corpus")
    good = planted["good"]
    words = good[12].split(" ")
    words[len(words) // 3] = "altered"
    near_of_12 = " ".join(words)
    (root / "corpus" / "z_more.jsonl").write_text(  # read after web.jsonl
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in [
                near_of_12,  # near web.jsonl:13: dropped
                near_of_12.upper(),  # its exact key and signature: dropped as it was
                near_of_12.replace(".", ""),  # its exact key, not its signature (punctuation): far from all, kept
                prose(500),
                prose(501),
                prose(900).upper(),  # copies of validation documents
                prose(901),
                f"{prose(700)} {' '.join(prose(902).split()[:20])} {prose(701)}",  # a 13-gram leak of one
            ]
        )
    )
    (root / "corpus" / "book.txt").write_text("\n\n".join(prose(600 + i, 90) for i in range(12)))
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in [prose(900), prose(901), prose(902)]))
    return root / "corpus", val


def _run(tmp: Path, name: str, corpus: Path, val: Path, *overrides):
    run = tmp / name
    cfg = tiny_config(
        run,
        "curate.rules=[markup, words, alpha_words, symbols, code]",
        "curate.near_dedup=0.7",
        "curate.min_words=20",
        "model.seq_len=16",
        "data.txt_split_kb=0.6",
        "data.shard_mb=0.002",  # several document and token shards
        "data.workers=2",
        f"data.val_sources=[{val}]",
        *overrides,
        sources=[str(corpus)],
    )
    return run, prepare_data(cfg, run, log=lambda line: None)


@pytest.mark.parametrize("dedup", [["curate.exact_dedup=true"], ["curate.exact_dedup=false"]], ids=["exact", "near"])
def test_beam_engine_writes_the_local_engines_dataset_byte_for_byte(tmp_path, dedup):
    corpus, val = _planted(tmp_path)
    if "false" in dedup[0]:  # and token streams per mixture part, the bundled eval tasks as gate references
        mixture = f"data.mixture=[web:0.6={corpus}/web.jsonl, rest:0.4={corpus}/z_more.jsonl;{corpus}/book.txt]"
        dedup = [*dedup, mixture, "data.decontaminate=[bundled]"]
    local, local_data = _run(tmp_path, "local", corpus, val, *dedup)
    beam, beam_data = _run(tmp_path, "beam", corpus, val, "data.engine=beam", *dedup)

    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file() and p.name != "report.png")
    assert files == sorted(p.relative_to(beam) for p in beam.rglob("*") if p.is_file() and p.name != "report.png")
    assert sum("documents-" in str(f) for f in files) >= 3 and sum(str(f).endswith(".bin") for f in files) >= 3
    for f in files:
        if f.name != "report.json":
            assert (local / f).read_bytes() == (beam / f).read_bytes(), f
    reports = [json.loads((r / "data" / "report.json").read_text()) for r in (local, beam)]
    for report in reports:
        report.pop("throughput")
    assert reports[0] == reports[1]
    removed = {rule: n for rule, (n, _) in reports[0]["removed"].items()}
    # the planted cases happened: training copies of validation, near and (with exact dedup) exact copies
    # (near_dup: web.jsonl's 10, z_more.jsonl:1 near web.jsonl:13, then its exact copy: near too, as the
    # streaming index answers for a text it has seen)
    assert removed["contamination"] == 2 and removed["near_dup"] == 12
    assert removed.get("exact_dup", 0) == (10 if "true" in dedup[0] else 0)
    assert all(isinstance(pair["kept"], str) for pair in reports[0]["near_dup_clusters"]["examples"])
    shards = sorted((local / "data" / "documents").glob("*.array_record"))
    kept = {r["source"].rsplit("/", 1)[-1] for r in read_documents(shards)}
    assert "z_more.jsonl:3" in kept and not kept & {"z_more.jsonl:1", "z_more.jsonl:2"}  # the punctuation variant
    assert reports[0]["read"]["files"] == 4 and reports[0]["read"]["bad_rows"] == 1
    gate = reports[0]["contamination_check"]
    assert gate["removed_train_documents"] == 1 and gate["references"]["validation"]["examples"][0].endswith(":8")
    streams = [getattr(data.train, "sources", [data.train]) for data in (local_data, beam_data)]  # a mixture's parts
    assert len(streams[0]) == len(streams[1]) == (2 if "false" in dedup[0] else 1)
    for a, b in zip(*streams):  # the same training windows
        assert len(a) == len(b) > 0
        for i in (0, len(a) - 1):
            np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])


def test_beam_engine_stops_on_a_strict_bad_row_with_one_line(tmp_path):
    corpus, val = _planted(tmp_path)
    with pytest.raises(UserError, match=r"^.*web\.jsonl:57: malformed JSON") as err:
        _run(tmp_path, "strict", corpus, val, "data.engine=beam", "data.bad_rows=strict")
    assert "\n" not in str(err.value)


def test_a_pipeline_that_cannot_run_is_one_line_naming_its_log(tmp_path):
    corpus, val = _planted(tmp_path)
    with pytest.raises(
        UserError, match=r"the Beam pipeline \(curating 4 files\) failed: .*NoSuchRunner.*; its log: "
    ) as err:
        _run(tmp_path, "bad", corpus, val, "data.engine=beam", "data.beam_options=[--runner=NoSuchRunner]")
    log = Path(str(err.value).rsplit("its log: ", 1)[1])
    assert "\n" not in str(err.value) and log.is_file()
    log.unlink()


def test_beam_engine_prints_progress_lines_from_its_workers(tmp_path):
    corpus, _ = _planted(tmp_path)
    lines = []
    run = tmp_path / "progress"
    cfg = tiny_config(run, "data.engine=beam", "data.workers=2", "data.progress_s=0", sources=[str(corpus)])
    prepare_data(cfg, run, log=lines.append)
    for stage in ("curating", "tokenizing"):
        found = [x for x in lines if re.fullmatch(stage + r": [\d.]+ MB in \d+ s \([\d.]+ MB/s\); [\d,]+ documents", x)]
        assert found, (stage, lines)


def test_pipelines_run_in_the_main_thread(tmp_path):
    """Cluster runners (Flink, Spark) start a job server that installs signal handlers, which Python allows in
    the main thread only: the pipeline runs there, the progress reporter beside it."""
    import threading

    import apache_beam as beam

    from llm_jax.data.beam import runner

    threads = []

    def build(p):
        threads.append(threading.current_thread() is threading.main_thread())
        p | beam.Create([1, 2]) | beam.Map(lambda x: x)

    cfg = tiny_config(tmp_path / "run", "data.workers=1")
    runner.run(cfg.data, runner.scratch_dir(tmp_path / "scratch"), build, "a test", "testing", lambda line: None)
    assert threads == [True]


def test_the_default_runner_is_the_same_on_every_machine(tmp_path, monkeypatch):
    """The default options name Beam's FnApiRunner. Its DirectRunner first tries Prism, a binary it downloads
    from GitHub: on a machine online the pipeline would then run on another runner than here, offline it
    waits for the download to fail, and either way it leaves a beam-temp directory in the temp directory."""
    import tempfile

    import apache_beam as beam

    from llm_jax.data.beam import runner

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    cfg = tiny_config(tmp_path / "run", "data.workers=2")
    scratch = runner.scratch_dir(tmp_path / "scratch")

    def build(p):
        runner.saved(p | beam.Create([3]) | beam.Map(lambda x: x * 2), scratch, "x")

    runner.run(cfg.data, scratch, build, "a test", "testing", lambda line: None)
    assert runner.load(scratch, "x") == 6
    assert list(temp.iterdir()) == []
