"""The curation pipeline end to end: sources of every kind, rule attribution, dedup and the
contamination check, the report, byte-identical reruns, interrupted builds, bad input, and the
loader over the token shards (workers, resume, hosts, no attention across documents)."""

import gzip
import json
import random
import re
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import tiny_config

from llm_jax.config import load_config
from llm_jax.data.corpus import ReadStats, read_documents
from llm_jax.data.loader import train_iterator
from llm_jax.errors import UserError
from llm_jax.train.objectives import prepare_data

WORDS = [
    "time",
    "river",
    "stone",
    "light",
    "music",
    "paper",
    "garden",
    "window",
    "silver",
    "morning",
    "winter",
    "letter",
    "story",
    "mountain",
    "forest",
    "market",
    "harbour",
    "engine",
    "shadow",
    "question",
    "answer",
    "number",
    "market",
    "kitchen",
    "doctor",
    "village",
    "summer",
    "island",
]


def prose(seed: int, n_words: int = 120) -> str:
    """Ordinary-looking sentences that pass every default quality rule, different for each seed."""
    rng = random.Random(seed)
    words = [f"{rng.choice(WORDS)}{rng.randrange(1000)}" if i % 7 == 3 else rng.choice(WORDS) for i in range(n_words)]
    sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3))


def _read(sources, bad_rows="skip"):
    stats = ReadStats()
    return [d.text for d in read_documents(sources, "text", "unused", bad_rows, None, stats)], stats


# ------------------------------------------------------------------------------------------------
# Sources


def test_compressed_jsonl_and_parquet_are_streamed_row_by_row(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(
        pa.table({"text": [r["text"] for r in rows], "n": list(range(5))}), tmp_path / "c.parquet", row_group_size=2
    )
    texts, stats = _read([str(tmp_path)])
    assert texts == [r["text"] for r in rows] * 3 and stats.files == 3 and stats.skipped_files == 0
    with pytest.raises(UserError, match=r"c.parquet has no column 'body' \(columns: text, n\); set data.text_field"):
        list(read_documents([str(tmp_path / "c.parquet")], "body", "unused", "skip", None, ReadStats()))


def test_split_groups_do_not_depend_on_where_the_corpus_lies(tmp_path, monkeypatch):
    def groups(source):
        return [d.group for d in read_documents([source], "text", "unused", "skip", None, ReadStats())]

    for place in ("here", "elsewhere/deeper"):
        (tmp_path / place / "books").mkdir(parents=True)
        (tmp_path / place / "books" / "one.txt").write_text("a book")
        (tmp_path / place / "rows.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
        pq.write_table(pa.table({"text": ["c", "d"]}), tmp_path / place / "rows.parquet")
    expected = ["books/one.txt", "rows.jsonl:1", "rows.jsonl:3", "rows.parquet:0", "rows.parquet:1"]
    for place in ("here", "elsewhere/deeper"):
        root = tmp_path / place
        assert groups(str(root)) == groups(f"{root}/") == groups(f"{root}/**/*.*") == expected
        assert groups(str(root / "rows.jsonl")) == expected[1:3] and groups(f"{root}/b*/*.txt") == expected[:1]
    monkeypatch.chdir(tmp_path / "here")
    assert groups(".") == groups("./") == expected and groups("rows.*") == expected[1:]


def test_binary_files_are_skipped_and_counted_broken_rows_listed(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (tmp_path / "fake.txt").write_bytes(b"ELF\0\0\0binary")
    (tmp_path / "notgz.jsonl.gz").write_text('{"text": "plain"}\n')
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\nnot json\n{"body": "b"}\n{"text": "c"}\n')
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "first"}\n' * 50)[:-12])
    texts, stats = _read([str(tmp_path)])
    assert texts[-3:] == ["fine text", "a", "c"] and set(texts[:-3]) == {"first"}  # the lines before the cut
    assert stats.skipped_files == 3
    assert sorted(e.split(": ", 1)[1] for e in stats.examples["skipped_files"]) == [
        "binary",
        "binary, or not .jsonl.gz data",
        "binary, or not .txt data",
    ]
    bad = stats.examples["bad_rows"]
    assert stats.bad_rows == 3 and any("rows.jsonl:2: malformed JSON" in b for b in bad)
    assert any("rows.jsonl:3: expected an object with a string field 'text'" in b for b in bad)
    assert any("cut.jsonl.gz:" in b and "unreadable .jsonl.gz data" in b for b in bad)
    with pytest.raises(UserError, match="rows.jsonl:2: malformed JSON"):
        _read([str(tmp_path / "rows.jsonl")], bad_rows="strict")


# ------------------------------------------------------------------------------------------------
# The pipeline


def _corpus(root: Path) -> dict:
    """Planted documents: 30 good, 10 exact and 10 near copies, one per quality rule, junk."""
    root.mkdir(parents=True, exist_ok=True)
    good = [prose(i) for i in range(30)]
    exact = [good[i].upper().replace(".", "!") for i in range(10)]  # same normalized text
    near = []
    for i in range(10, 20):
        words = good[i].split(" ")
        words[len(words) // 2] = "changed"
        near.append(" ".join(words))
    bad = {
        "words": "Too short to keep.",
        "alpha_words": " ".join(["123 456 789 000"] * 20),
        "symbols": prose(100).replace(".", " ###."),
        "code": "\n".join(
            [
                "import numpy as np;",
                "def compute(values, offset, scale):",
                "    total = numpy.sum(values);",
                "    return total;",
                "class Engine extends Base {",
                "    public void run() { start(); }",
            ]
            * 8
        ),
        "markup": "<html><body><div><p>hi</p></div>"
        + "<div class='nav'><a href='#'>x</a></div>" * 80
        + "</body></html>",
    }
    rows = good + exact + near + list(bad.values()) + ["   \n\t "]
    with open(root / "web.jsonl", "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
        f.write("{broken\n")
    return {"good": good, "bad": bad}


def _prepare(tmp_path, name, *overrides, corpus=None):
    corpus = corpus or tmp_path / "corpus"
    run = tmp_path / name
    cfg = tiny_config(
        run,
        "curate.rules=[markup, words, alpha_words, symbols, code]",
        "curate.exact_dedup=true",
        "curate.near_dedup=0.7",
        "curate.min_words=20",
        "model.seq_len=16",
        "data.val_fraction=0.2",
        *overrides,
        sources=[str(corpus)],
    )
    lines = []
    data = prepare_data(cfg, run, log=lines.append)
    return run, data, json.loads((run / "data" / "report.json").read_text()), lines


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curate")
    planted = _corpus(tmp / "corpus")
    return tmp, planted, _prepare(tmp, "run")


def test_every_removed_document_is_attributed_to_the_first_rule_and_reported(curated):
    _, planted, (run, data, report, lines) = curated
    removed = {rule: n for rule, (n, _) in report["removed"].items()}
    assert removed == {
        "empty": 1,
        "markup": 1,
        "words": 1,
        "alpha_words": 1,
        "symbols": 1,
        "code": 1,
        "exact_dup": 10,
        "near_dup": 10,
    }
    assert report["read"]["documents"] == 56 and report["read"]["bad_rows"] == 1 and report["kept"]["documents"] == 30
    assert report["removed_examples"]["code"][0]["text"].startswith("import numpy as np;")
    assert report["near_dup_clusters"]["clusters"] == 10 and report["near_dup_clusters"]["largest"] == 2
    assert report["near_dup_clusters"]["examples"][0]["kept"].endswith("web.jsonl:11")
    assert report["contamination_check"]["removed_train_documents"] == 0  # clean data: the gate finds nothing
    lsh = report["near_dup_lsh"]  # curate.near_dedup=0.7 here
    assert (lsh["bands"], lsh["rows"]) == (17, 4) and lsh["candidate_probability"]["0.7"] >= 0.99
    assert "near dedup at Jaccard 0.7: 17 bands x 4 rows, candidate 0.67 at 0.5, 0.99 at 0.7, 1.00 at 0.9" in lines
    assert (run / "data" / "report.png").stat().st_size > 1000
    assert any(line.startswith("near_dup") and line.split()[1] == "10" for line in lines)
    # What was kept is exactly the good documents, cleaned, split between train and val.
    docs = (run / "data" / "documents").glob("*.array_record")
    from llm_jax.data.shards import read_documents as records

    assert sorted(r["text"] for r in records(sorted(docs))) == sorted(planted["good"])
    split = report["splits"]
    assert split["train"]["documents"] + split["val"]["documents"] == 30 and split["val"]["documents"] >= 1
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == sum(
        p.stat().st_size // 2 for p in (run / "data").glob("*.bin")
    )


def test_rerun_is_byte_identical_whatever_the_workers_and_survives_an_interruption(curated, tmp_path):
    tmp, _, (run, *_rest) = curated
    # An interrupted build: a strict bad row stops it after shards were written; nothing half-made is left.
    with pytest.raises(UserError, match="web.jsonl:57: malformed JSON"):
        _prepare(tmp, "again", "data.bad_rows=strict", "data.workers=2", "data.shard_mb=0.001")
    assert not (tmp / "again" / "data").exists() and (tmp / "again" / "data.partial").exists()
    again, *_ = _prepare(tmp, "again", "data.workers=2")
    files = sorted(
        p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name not in ("report.json", "report.png")
    )
    assert files == sorted(
        p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name not in ("report.json", "report.png")
    )
    for f in files:
        assert (run / f).read_bytes() == (again / f).read_bytes(), f
    assert not (again / "data.partial").exists()


def test_validation_sources_win_over_training_copies(tmp_path):
    corpus, val = tmp_path / "corpus", tmp_path / "val"
    corpus.mkdir()
    val.mkdir()
    docs = [prose(i) for i in range(12)]
    (val / "v.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:2]))
    copy = docs[1].split(" ")
    copy[3] = "edited"
    (corpus / "c.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in docs[2:] + [docs[0], " ".join(copy)])
    )
    _, _, report, _ = _prepare(tmp_path, "run", f"data.val_sources=[{val}]", corpus=corpus)
    assert report["removed"]["contamination"][0] == 2  # the exact and the near copy of the val documents
    assert report["splits"]["val"]["documents"] == 2 and report["splits"]["train"]["documents"] == 10
    assert report["contamination_check"]["removed_train_documents"] == 0  # dedup took the copies already


def test_curation_and_tokenizing_print_progress(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "c.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(12)))
    *_, lines = _prepare(tmp_path, "run", "data.progress_s=0", corpus=corpus)
    curating = [line for line in lines if line.startswith("curating: ")]
    assert len(curating) == 12  # one per document at progress_s=0
    assert re.fullmatch(r"curating: [\d.]+ MB in \d+ s \([\d.]+ MB/s\); 12 read, 11 kept", curating[-1])
    assert any(re.fullmatch(r"tokenizing: 0.0 MB in \d+ s \([\d.]+ MB/s\); 0 of 12 documents, 0%", x) for x in lines)
    assert any(re.fullmatch(r"tokenizer: training a \d+-piece BPE model on [\d.]+ MB of text \.\.\.", x) for x in lines)
    *_, quiet = _prepare(tmp_path, "run2", corpus=corpus)  # the default: at most one line per 30 s
    assert not any(line.startswith(("curating: ", "tokenizing: ")) for line in quiet)


def test_loops_of_known_length_print_periodic_lines_when_the_output_is_not_a_terminal():
    from llm_jax.data.progress import progress

    lines = []
    assert list(progress(iter(range(5)), 5, "judging (pairwise)", lines.append, every_s=0)) == list(range(5))
    assert len(lines) == 4 and re.fullmatch(r"judging \(pairwise\): 2 of 5 \(40%\), [\d.]+/s, \d+ min left", lines[1])
    lines.clear()
    assert list(progress(range(3), 3, "scoring", lines.append)) == [0, 1, 2] and lines == []  # under 30 s: quiet


def test_contamination_gate_removes_planted_13_gram_leaks(tmp_path):
    """Training documents that quote 13+ words of a bundled eval task or of a validation document, inside
    otherwise new text (far below any near-copy threshold), are removed from training and counted per
    reference; the clean ones stay."""
    from llm_jax.data.contamination import task_texts

    corpus, val = tmp_path / "corpus", tmp_path / "val"
    corpus.mkdir()
    val.mkdir()
    tasks = task_texts("bundled")
    quotes = {name: next(t for t in texts if len(t.split()) >= 40) for name, texts in tasks.items()}
    val_doc = prose(1000, 200)
    (val / "v.jsonl").write_text(json.dumps({"text": val_doc}) + "\n")
    docs = [prose(i, 300) for i in range(12)]
    leaks = {name: 2 * k for k, name in enumerate(quotes)}  # doc index -> quoted task
    for name, i in leaks.items():
        words = docs[i].split(" ")
        docs[i] = " ".join(words[:150] + quotes[name].split()[5:25] + words[150:])
    words = docs[9].split(" ")
    docs[9] = " ".join(words[:100] + val_doc.split(" ")[40:55] + words[100:])  # 15 words of the validation text
    (corpus / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    *_, report, lines = _prepare(
        tmp_path, "run", f"data.val_sources=[{val}]", "data.decontaminate=[bundled]", "curate.rules=[]", corpus=corpus
    )
    gate = report["contamination_check"]
    assert gate["removed_train_documents"] == len(leaks) + 1
    hits = {name: r["train_documents_hit"] for name, r in gate["references"].items()}
    assert hits["validation"] == 1 and set(hits) == {"validation", *(f"task:{name}" for name in quotes)}
    assert all(hits[f"task:{name}"] >= 1 for name in quotes)  # (the bundled tasks quote the same plays: 1-2 each)
    assert gate["references"]["validation"]["examples"] == [f"{corpus / 'c.jsonl'}:10"]
    assert report["splits"]["train"]["documents"] == 12 - len(leaks) - 1
    assert any("contamination gate (13-grams): 4 training documents removed" in line for line in lines)


def test_nothing_left_after_filtering_names_the_rule(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "short.jsonl").write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(5)))
    with pytest.raises(
        UserError,
        match=r"curation kept none of the 5 documents \(words: 5\); 'words' removed "
        r"the most: relax its threshold in the curate section, or drop 'words'",
    ):
        _prepare(tmp_path, "run", corpus=corpus)


def test_validation_kept_but_no_training_document_names_the_rule(tmp_path):
    """A user's own two files: the rules remove the one training document while validation keeps its own;
    one line naming the rule, not sentencepiece's '!sentences_.empty()' traceback."""
    corpus, val = tmp_path / "corpus", tmp_path / "val"
    corpus.mkdir()
    val.mkdir()
    (corpus / "short.jsonl").write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(3)))
    (val / "v.jsonl").write_text(json.dumps({"text": prose(0)}) + "\n")
    with pytest.raises(
        UserError,
        match=r"curation kept none of the training documents of \[.*corpus'\] \(words: 3\); 'words' removed "
        r"the most: relax its threshold in the curate section, or drop 'words'",
    ):
        _prepare(tmp_path, "run", f"data.val_sources=[{val}]", corpus=corpus)


# ------------------------------------------------------------------------------------------------
# The loader over the shards


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume_exactly(curated):
    _, _, (_, data, _, _) = curated
    plain = train_iterator(data.train, 4, seed=1)
    expected = [next(plain)["tokens"] for _ in range(12)]
    workers = train_iterator(data.train, 4, seed=1, workers=2)
    got = [next(workers)["tokens"] for _ in range(5)]
    state = workers.get_state()
    resumed = train_iterator(data.train, 4, seed=1, workers=2)
    resumed.set_state(json.loads(json.dumps(state)))
    got += [next(resumed)["tokens"] for _ in range(7)]
    assert all((a == b).all() for a, b in zip(expected, got))


def test_hosts_cover_every_window_once_per_epoch(curated):
    _, _, (_, data, _, _) = curated
    n = len(data.train) // 8 * 8
    seen = []
    for p in range(4):
        it = train_iterator(data.train, 8, seed=0, process_index=p, process_count=4)
        seen += [row.tobytes() for _ in range(n // 8) for row in next(it)["tokens"]]
    epoch = [data.train[i]["tokens"].tobytes() for i in range(len(data.train))]
    assert len(seen) == n and len(set(seen)) == len(seen) and set(seen) <= set(epoch)


@pytest.mark.slow
def test_attention_never_crosses_a_document_boundary():
    """A packed window's second document gets exactly the logits it gets alone (after its EOS)."""
    from conftest import tiny_config as _cfg

    from llm_jax.model.transformer import Transformer

    cfg = _cfg("unused", "model.seq_len=16").model
    model = Transformer(cfg)
    eos, a, b = 1, [5, 9, 7, 300, 11, 4], [8, 21, 13, 99, 6]
    window = np.array([a + [eos] + b + [eos] + [17, 18, 19]])  # [1, 16]
    segments = np.cumsum(window == eos, axis=1)
    params = model.init(jax.random.PRNGKey(0), window)["params"]
    packed, _ = model.apply({"params": params}, window, segments=segments)
    alone, _ = model.apply({"params": params}, np.array([[eos] + b]))
    np.testing.assert_allclose(packed[0, len(a) : len(a) + 1 + len(b)], alone[0], atol=1e-5)
    leaky, _ = model.apply({"params": params}, window)  # without segments the first document leaks in
    assert np.abs(leaky[0, len(a) + 1 : len(a) + 1 + len(b)] - alone[0, 1:]).max() > 1e-3


@pytest.mark.parametrize("split_kb", [64, 0])
def test_a_single_text_file_is_cut_into_documents_and_trains_with_the_default_rules(tmp_path, corpus_slice, split_kb):
    """One ~750 KB .txt of plays for training and one for validation, the default curate section: whole, the
    training file fails the rules (a book is not a web page); cut at blank lines into ~64 KB documents, it
    keeps most of them, and its documents stay together on the training side."""
    base = load_config(None).curate
    (tmp_path / "train.txt").write_text("\n\n".join(Path(p).read_text() for p in corpus_slice[:4]))
    (tmp_path / "val.txt").write_text(Path(corpus_slice[4]).read_text())
    cfg = tiny_config(
        tmp_path / "run",
        f"curate.rules=[{', '.join(base.rules)}]",
        "curate.exact_dedup=true",
        f"curate.near_dedup={base.near_dedup}",
        f"data.val_sources=[{tmp_path / 'val.txt'}]",
        f"data.txt_split_kb={split_kb}",
        sources=[str(tmp_path / "train.txt")],
    )
    if not split_kb:
        with pytest.raises(UserError, match=r"curation kept none of the training documents of \[.*train.txt'\]"):
            prepare_data(cfg, tmp_path / "run", log=lambda *_: None)
        return
    data = prepare_data(cfg, tmp_path / "run", log=lambda *_: None)
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    size = (tmp_path / "train.txt").stat().st_size
    assert report["read"]["documents"] == -(-size // (64 << 10)) + 2  # pieces just under 64 KB, and the val file's
    assert report["splits"]["train"]["documents"] >= 0.8 * (report["read"]["documents"] - 2)
    assert len(data.train) > 1000 and len(data.val) > 0


def test_split_text_cuts_near_the_size_at_blank_lines_then_line_ends_and_loses_nothing():
    from llm_jax.data.corpus import split_text

    text = "a line\nanother\n\n" * 200 + "x" * 3000 + "\n" + ("y" * 99 + "\n") * 30 + "z" * 2500
    pieces = split_text(text, 1000)
    assert "".join(pieces) == text
    assert all(p.endswith("\n\n") and 500 <= len(p) <= 1000 for p in pieces[:3])  # blank lines before the size
    assert [len(p) for p in pieces[-3:]] == [1000, 1000, 500]  # no line end at all: cut at the size
    assert split_text("short", 1000) == ["short"]


def test_one_long_text_file_alone_holds_out_validation_pieces(tmp_path, corpus_slice):
    """Its pieces are groups of their own, so the split needs no second file (nanoGPT-style: part of the text)."""
    (tmp_path / "my.txt").write_text(Path(corpus_slice[0]).read_text())
    cfg = tiny_config(tmp_path / "run", "data.val_fraction=0.2", sources=[str(tmp_path / "my.txt")])
    data = prepare_data(cfg, tmp_path / "run", log=lambda *_: None)
    docs = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["documents"]
    assert docs["read"] >= 3 and 1 <= docs["val"] < docs["read"] and len(data.train) > 0 and len(data.val) > 0
