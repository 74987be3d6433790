import json
from pathlib import Path

import numpy as np
import pytest

from llm_jax.data.corpus import load_documents, split_documents
from llm_jax.data.loader import eval_batches, train_iterator
from llm_jax.data.packing import TokenWindows, token_dtype, write_stream
from llm_jax.data.tokenizer import CHAT_TOKENS, EOS, Tokenizer, train_tokenizer
from llm_jax.errors import UserError

TEXT = ("Kent.\nI thought the King had more affected the Duke of Albany than\nCornwall.\n\n"
        "   Glou. It did always seem so to us; but now, in the division\n") * 40


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


def test_packing_puts_eos_after_every_document_and_loses_nothing(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    n = write_stream(docs, eos_id=1, path=tmp_path / "s.bin", dtype=token_dtype(512))
    stream = np.fromfile(tmp_path / "s.bin", np.uint16)
    assert n == 12 and stream.tolist() == [5, 6, 7, 1, 8, 1, 9, 10, 11, 12, 13, 1]
    windows = TokenWindows(tmp_path / "s.bin", "uint16", seq_len=4)
    assert len(windows) == (12 - 1) // 4
    # Inputs of consecutive windows tile the stream; targets are the same stream shifted by one.
    inputs = np.concatenate([windows[i][:-1] for i in range(len(windows))])
    targets = np.concatenate([windows[i][1:] for i in range(len(windows))])
    assert inputs.tolist() == stream[:8].tolist() and targets.tolist() == stream[1:9].tolist()


def test_token_dtype_fits_the_vocab():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def _stream(tmp_path, n=1001, seq_len=8) -> TokenWindows:
    write_stream([list(range(2, n))], 1, tmp_path / "t.bin", np.dtype(np.uint16))
    return TokenWindows(tmp_path / "t.bin", "uint16", seq_len)


def test_train_iterator_is_seeded_covers_each_epoch_and_resumes_exactly(tmp_path):
    src = _stream(tmp_path)
    first = [b.copy() for _, b in zip(range(len(src) // 4), train_iterator(src, 4, seed=3))]
    again = [b for _, b in zip(range(len(src) // 4), train_iterator(src, 4, seed=3))]
    assert all((a == b).all() for a, b in zip(first, again))
    other = next(train_iterator(src, 4, seed=4))
    assert not (other == first[0]).all()
    starts = sorted(int(row[0]) for b in first for row in b)  # one epoch: every window exactly once
    assert starts == sorted(int(src[i][0]) for i in range(len(src) // 4 * 4))

    it = train_iterator(src, 4, seed=3)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(40)]  # crosses into the next (reshuffled) epoch
    resumed = train_iterator(src, 4, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))
    assert all((a == next(resumed)).all() for a in expected)


def test_hosts_read_disjoint_rows_that_make_up_the_global_batch(tmp_path):
    src = _stream(tmp_path)
    one = train_iterator(src, 8, seed=0)
    hosts = [train_iterator(src, 8, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        full = next(one)
        h0, h1 = next(hosts[0]), next(hosts[1])
        assert (h0 == full[0::2]).all() and (h1 == full[1::2]).all()


def test_eval_batches_spread_over_the_split_with_padding_weighted_out(tmp_path):
    src = _stream(tmp_path, n=60, seq_len=8)  # 7 windows
    batches = list(eval_batches(src, batch=4, max_batches=5))
    assert len(batches) == 2
    weights = np.concatenate([b["weights"][:, 0] for b in batches])
    assert weights.tolist() == [1] * 7 + [0]
    firsts = [int(t[0]) for b in batches for t, w in zip(b["tokens"], b["weights"][:, 0]) if w]
    assert firsts == [int(src[i][0]) for i in range(7)]
    subset = list(eval_batches(src, batch=2, max_batches=2))  # 4 of 7 windows: every 7 // 4 = 1st
    assert [int(t[0]) for b in subset for t in b["tokens"]] == [int(src[i][0]) for i in range(4)]
    spread = [int(t[0]) for b in eval_batches(_stream(tmp_path, n=1001, seq_len=8), 4, 2) for t in b["tokens"]]
    assert spread == [int(src_i) for src_i in (_stream(tmp_path, n=1001, seq_len=8)[i * 15][0] for i in range(8))]


def test_too_little_data_is_a_clear_error(tmp_path):
    src = _stream(tmp_path, n=30, seq_len=8)
    with pytest.raises(UserError, match="fewer than train.batch_size=16"):
        train_iterator(src, 16, seed=0)
    with pytest.raises(UserError, match="validation split has fewer than"):
        list(eval_batches(_stream(tmp_path, n=5, seq_len=8), 4, 1))


# ------------------------------------------------------------------------------------------------
# Corpus sources and bad input


def test_txt_jsonl_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n\n{"text": "gamma", "id": 2}\n')
    (tmp_path / "sub" / "ignored.csv").write_text("x,y")
    docs, stats = load_documents([str(tmp_path)], "text", "unused")
    assert [d.text for d in docs] == ["alpha text", "beta", "gamma"]
    assert docs[1].source.endswith("b.jsonl:1") and docs[2].source.endswith("b.jsonl:3")
    docs, _ = load_documents([str(tmp_path / "**" / "*.jsonl")], "text", "unused")
    assert [d.text for d in docs] == ["beta", "gamma"]
    docs, _ = load_documents([str(tmp_path / "sub" / "b.jsonl")], "text", "unused")
    assert len(docs) == 2 and stats.bytes == len("alpha textbetagamma")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes, keep \xe2\x82\xac")
    docs, stats = load_documents([str(tmp_path / "bad.txt")], "text", "unused")
    assert docs[0].text == "caf\ufffd and \ufffd\ufffd bytes, keep \u20ac"
    assert stats.replaced_bytes == 3


@pytest.mark.parametrize("setup, source, message", [
    (lambda p: None, "missing.txt", "does not exist; set data.sources"),
    (lambda p: (p / "d").mkdir(), "d", "has no .txt or .jsonl files"),
    (lambda p: (p / "e.txt").write_text("  \n"), "e.txt", "holds no text"),
    (lambda p: (p / "f.csv").write_text("x"), "f.csv", "unsupported file type '.csv'"),
    (lambda p: (p / "g.jsonl").write_text('{"text": "ok"}\n{"text": broken\n'), "g.jsonl", r"g.jsonl:2: malformed JSON"),
    (lambda p: (p / "h.jsonl").write_text('{"body": "x"}\n'), "h.jsonl", "h.jsonl:1: expected an object with a string"),
    (lambda p: None, "nomatch*.txt", "matches no .txt or .jsonl files"),
    (lambda p: None, "builtin:wikipedia", "unknown builtin corpus"),
])
def test_bad_sources_name_the_problem(tmp_path, monkeypatch, setup, source, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        load_documents([source], "text", "unused")


def test_split_is_seeded_by_group_and_never_empty(tmp_path):
    files = []
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
        files.append(str(tmp_path / f"{i}.txt"))
    docs, _ = load_documents(files, "text", "unused")
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not {d.source for d in train} & {d.source for d in val}
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert len(split_documents(docs, 0.001, seed=0)[1]) == 1
    with pytest.raises(UserError, match="need at least 2 documents"):
        split_documents(docs[:1], 0.1, seed=0)


def test_builtin_corpus_keeps_both_editions_of_a_work_together(corpus_slice):
    docs, stats = load_documents(["builtin:shakespeare"], "text", "~/.cache/llm_jax")
    assert stats.documents == 77 and stats.replaced_bytes == 0
    assert len({d.group for d in docs}) == 42  # works; 35 of them in two editions
    for seed in range(5):
        train, val = split_documents(docs, 0.05, seed)
        assert not {d.group for d in train} & {d.group for d in val}
    assert Path(corpus_slice[0]).is_file()
