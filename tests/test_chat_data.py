"""SFT / DPO example building (llm_jax/data/chat_data.py): the rendered tokens and their weights,
packing into segmented rows, DPO padding, truncation, bad rows, the sources, and the array source
the grain loaders read. A real tokenizer trained by llm_jax (it has the chat control tokens)."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from llm_jax.data.chat_data import ExampleRows, dpo_example, load_examples, pack_sft, pad_dpo, save_array, sft_example
from llm_jax.data.chat_template import special_ids
from llm_jax.data.loader import eval_batches, train_iterator
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError

Q, A = "What is 2 + 3?", "5"
QA = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
GOOD = {"sft": {"messages": QA}, "dpo": {"prompt": Q, "chosen": "5", "rejected": "6"}}


@pytest.fixture(scope="module")
def tok(prepared_template) -> Tokenizer:
    return Tokenizer(prepared_template / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(tok) -> dict[str, int]:
    return special_ids(tok)


def _jsonl(path, rows, newline="\n"):
    """Rows (dicts as JSON, strings verbatim, so "" is a blank line) one per line."""
    path.write_bytes("".join((r if isinstance(r, str) else json.dumps(r)) + newline for r in rows).encode())
    return str(path)


def _load(tmp_path, tok, rows, kind="sft", length=65, bad_rows="strict"):
    return load_examples([_jsonl(tmp_path / "d.jsonl", rows)], kind, tok, length, bad_rows, "unused")


def _turn(tok, sp, role, text):
    """One turn of the template, built by hand: <|role|> text <|end_of_turn|>."""
    return [sp[role]] + tok.encode(text) + [sp["end_of_turn"]]


def _expected(tok, sp, messages):
    """(ids, weights) of a conversation per the template spec: EOS, then each turn; weight 1 on the
    text and end of turn of assistant turns only (never on a role marker)."""
    ids, weights = [tok.eos_id], [0.0]
    for m in messages:
        turn = _turn(tok, sp, m["role"], m["content"])
        ids += turn
        weights += [0.0] + [float(m["role"] == "assistant")] * (len(turn) - 1)
    return ids, weights


# ------------------------------------------------------------------------------------------------
# SFT rows -> examples


def test_sft_examples_weight_exactly_the_assistant_text_and_its_end_of_turn(tmp_path, tok, sp):
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    examples, counts = _load(tmp_path, tok, [{"messages": QA}, {"messages": multi, "id": 7}])
    assert dict(counts) == {"lines": 2, "examples": 2}
    assert examples == [_expected(tok, sp, QA), _expected(tok, sp, multi)]
    ids, weights = examples[1]
    assert ids[0] == tok.eos_id and len(ids) == len(weights)
    trained = [i for i, w in zip(ids, weights) if w == 1.0]
    assert trained == tok.encode("5") + [sp["end_of_turn"]] + tok.encode("It is 8.") + [sp["end_of_turn"]]
    assert set(weights) == {0.0, 1.0}
    assert not any(w for i, w in zip(ids, weights) if i in (sp["assistant"], sp["user"], sp["system"], tok.eos_id))
    # the QA example, spelled out: EOS <|user|> Q <|end_of_turn|> <|assistant|> 5 <|end_of_turn|>
    q = tok.encode(Q)
    assert examples[0] == (
        [tok.eos_id, sp["user"], *q, sp["end_of_turn"], sp["assistant"], *tok.encode(A), sp["end_of_turn"]],
        [0.0] * (len(q) + 4) + [1.0] * (len(tok.encode(A)) + 1),
    )
    assert sft_example(tok, {"messages": multi}, "x.jsonl:1") == examples[1]


def test_sft_sources_are_read_in_order_and_blank_lines_are_not_rows(tmp_path, tok):
    rows = [{"messages": [QA[0], {"role": "assistant", "content": str(i)}]} for i in range(5)]
    first = _jsonl(tmp_path / "b.jsonl", ["", rows[0], "   ", rows[1]], newline="\r\n")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    _jsonl(tmp_path / "dir" / "z.jsonl", [rows[3]])
    _jsonl(tmp_path / "dir" / "sub" / "a.jsonl", [rows[2], "", rows[4]])
    examples, counts = load_examples([first, str(tmp_path / "dir")], "sft", tok, 65, "strict", "unused")
    assert dict(counts) == {"lines": 5, "examples": 5}
    # the sources in the given order; a directory's files sorted by path (dir/sub/a before dir/z)
    answers = [tok.decode([i for i, w in zip(ids, ws) if w][:-1]) for ids, ws in examples]
    assert answers == ["0", "1", "2", "4", "3"]


def test_invalid_utf8_in_a_row_is_replaced_not_fatal(tmp_path, tok, sp):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"messages": [{"role": "user", "content": "caf\xff"}, {"role": "assistant", "content": "ok"}]}\n'
    )
    examples, counts = load_examples([str(path)], "sft", tok, 65, "strict", "unused")
    assert dict(counts) == {"lines": 1, "examples": 1}
    msgs = [{"role": "user", "content": "caf\ufffd"}, {"role": "assistant", "content": "ok"}]
    assert examples == [_expected(tok, sp, msgs)]


# ------------------------------------------------------------------------------------------------
# Packing


def _fake(n, first_trained, start):
    """An example of n tokens (EOS first, then distinct ids from `start`), weight 1 from first_trained on."""
    return [1] + list(range(start, start + n - 1)), [0.0] * first_trained + [1.0] * (n - first_trained)


def test_pack_sft_fills_rows_in_order_and_numbers_segments():
    examples = [
        _fake(5, 3, 100),
        _fake(4, 2, 200),
        _fake(6, 4, 300),
        _fake(3, 1, 400),
        _fake(8, 5, 500),
        _fake(2, 1, 600),
    ]
    packed = pack_sft(examples, 10)
    # 5 + 4 = 9 (the 6 does not fit) | 6 + 3 = 9 (the 8 does not fit) | 8 + 2 = 10 exactly
    assert set(packed) == {"tokens", "segments", "weights"}
    assert packed["tokens"].dtype == np.int32 and packed["segments"].dtype == np.int32
    assert packed["weights"].dtype == np.float32
    assert packed["tokens"].shape == packed["segments"].shape == (3, 10) and packed["weights"].shape == (3, 9)
    np.testing.assert_array_equal(
        packed["segments"], [[1] * 5 + [2] * 4 + [0], [1] * 6 + [2] * 3 + [0], [1] * 8 + [2] * 2]
    )
    rows = [[0, 1], [2, 3], [4, 5]]
    for r, members in enumerate(rows):
        at = 0
        for k, e in enumerate(members, start=1):
            ids, w = examples[e]
            assert packed["tokens"][r, at : at + len(ids)].tolist() == ids
            assert (packed["segments"][r, at : at + len(ids)] == k).all()
            # weights[:, j] is the weight of target tokens[:, j + 1]
            if at == 0:
                assert packed["weights"][r, : len(ids) - 1].tolist() == w[1:]
            else:  # the target at the boundary is this example's EOS: weight 0
                assert packed["weights"][r, at - 1 : at + len(ids) - 1].tolist() == w and w[0] == 0
            at += len(ids)
        assert (packed["tokens"][r, at:] == 0).all() and (packed["segments"][r, at:] == 0).all()
        assert (packed["weights"][r, at - 1 :] == 0).all()
    assert packed["weights"].sum() == sum(sum(w) for _, w in examples) == 2 + 2 + 2 + 2 + 3 + 1


def test_pack_sft_of_real_examples_never_trains_a_target_across_examples(tmp_path, tok):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count {'x ' * i}"},
                {"role": "assistant", "content": "word " * (i % 4 + 1)},
            ]
        }
        for i in range(12)
    ]
    examples, counts = _load(tmp_path, tok, rows, length=48)
    assert counts["examples"] == 12 and "truncated to the context" not in counts
    packed = pack_sft(examples, 48)
    tokens, segments, weights = packed["tokens"], packed["segments"], packed["weights"]
    # every example appears whole, in order, once
    flat = [tokens[r, segments[r] == k].tolist() for r in range(len(tokens)) for k in range(1, segments[r].max() + 1)]
    assert flat == [ids for ids, _ in examples]
    # a target is trained only inside one example: same nonzero segment as its input
    trained = weights > 0
    assert (segments[:, :-1][trained] == segments[:, 1:][trained]).all() and (segments[:, 1:][trained] > 0).all()
    boundary = segments[:, 1:] != segments[:, :-1]
    assert not weights[boundary].any()
    # each example starts with EOS, whose target weight is 0; the trained targets are the assistant text + end of turn
    starts = np.zeros_like(segments, bool)
    starts[:, 0] = True
    starts[:, 1:] = boundary & (segments[:, 1:] > 0)
    assert (tokens[starts] == tok.eos_id).all() and starts.sum() == 12
    assert sorted(tokens[:, 1:][trained].tolist()) == sorted(i for ids, w in examples for i, x in zip(ids, w) if x)
    assert weights.sum() == sum(sum(w) for _, w in examples)
    # an example that does not fit the current row starts the next: no row could have held the next one
    for r in range(len(tokens) - 1):
        used = int((segments[r] > 0).sum())
        assert used + int((segments[r + 1] == 1).sum()) > 48


def test_pack_sft_exact_fit_and_single_example_rows():
    a, b = _fake(4, 2, 10), _fake(4, 1, 20)
    packed = pack_sft([a, b], 4)
    np.testing.assert_array_equal(packed["segments"], [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(packed["tokens"], [a[0], b[0]])
    np.testing.assert_array_equal(packed["weights"], [a[1][1:], b[1][1:]])
    empty = pack_sft([], 4)
    assert empty["tokens"].shape == (0, 4) and empty["weights"].shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# DPO pairs


def test_dpo_prompt_as_text_or_messages_and_response_as_text_or_one_message(tmp_path, tok, sp):
    rows = [
        {"prompt": Q, "chosen": "5", "rejected": "6"},
        {"messages": [QA[0]], "chosen": "5", "rejected": "6"},
        {
            "prompt": Q,
            "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "6"}],
        },
        {"prompt": "  ", "messages": [QA[0]], "chosen": "5", "rejected": "6"},
    ]  # blank prompt: messages used
    examples, counts = _load(tmp_path, tok, rows, kind="dpo")
    assert dict(counts) == {"lines": 4, "examples": 4}
    assert examples[0] == examples[1] == examples[2] == examples[3]
    (c_ids, c_w), (r_ids, r_w) = examples[0]
    prefix = [tok.eos_id, *_turn(tok, sp, "user", Q), sp["assistant"]]
    assert c_ids == prefix + tok.encode("5") + [sp["end_of_turn"]]
    assert r_ids == prefix + tok.encode("6") + [sp["end_of_turn"]]
    assert c_w == [0.0] * len(prefix) + [1.0] * (len(tok.encode("5")) + 1)
    assert r_w == [0.0] * len(prefix) + [1.0] * (len(tok.encode("6")) + 1)
    assert dpo_example(tok, rows[0], "x.jsonl:1") == examples[0]


def test_dpo_pairs_share_a_multi_turn_prompt_and_differ_only_in_the_response(tmp_path, tok, sp):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Which is larger, 3 or 9?"},
    ]
    row = {"messages": messages, "chosen": "9", "rejected": "Well, I think it is 9 of course."}
    [((c_ids, c_w), (r_ids, r_w))], _ = _load(tmp_path, tok, [row], kind="dpo")
    prefix = [tok.eos_id] + [i for m in messages for i in _turn(tok, sp, m["role"], m["content"])] + [sp["assistant"]]
    assert c_ids[: len(prefix)] == r_ids[: len(prefix)] == prefix
    assert c_ids[len(prefix) :] == tok.encode("9") + [sp["end_of_turn"]]
    assert r_ids[len(prefix) :] == tok.encode(row["rejected"]) + [sp["end_of_turn"]]
    # the assistant turn inside the prompt is context only: weight 1 on the response and its end of turn only
    assert c_w == [0.0] * len(prefix) + [1.0] * (len(c_ids) - len(prefix))
    assert r_w == [0.0] * len(prefix) + [1.0] * (len(r_ids) - len(prefix))


def test_pad_dpo_zero_pads_and_shifts_weights_to_targets(tmp_path, tok, sp):
    rows = [
        {"prompt": Q, "chosen": "5", "rejected": "The answer is six."},
        {"prompt": "Which is larger, 3 or 9?", "chosen": "9", "rejected": "3"},
    ]
    examples, _ = _load(tmp_path, tok, rows, kind="dpo")
    length = max(len(ids) for pair in examples for ids, _ in pair) + 3
    arrays = pad_dpo(examples, length)
    assert set(arrays) == {"tokens", "weights"}
    assert arrays["tokens"].shape == (2, 2, length) and arrays["tokens"].dtype == np.int32
    assert arrays["weights"].shape == (2, 2, length - 1) and arrays["weights"].dtype == np.float32
    for i, pair in enumerate(examples):
        for j, (ids, w) in enumerate(pair):
            n = len(ids)
            assert arrays["tokens"][i, j].tolist() == ids + [0] * (length - n)
            # weights[..., t] is the weight of target tokens[..., t + 1]
            assert arrays["weights"][i, j].tolist() == w[1:] + [0.0] * (length - n)
            first = w.index(1.0)  # the first response token, predicted from the <|assistant|> marker
            assert ids[first - 1] == sp["assistant"] and arrays["weights"][i, j, first - 1] == 1.0
            assert arrays["weights"][i, j, : first - 1].sum() == 0
            assert arrays["weights"][i, j].sum() == sum(w) == n - first
    # chosen and rejected of a pair share the prompt tokens
    first = examples[0][0][1].index(1.0)
    np.testing.assert_array_equal(arrays["tokens"][0, 0, :first], arrays["tokens"][0, 1, :first])


# ------------------------------------------------------------------------------------------------
# Bad rows


BAD = [  # (row, kind, what the message says, the skip counter)
    ('{"messages": [', "sft", "malformed JSON", "malformed JSON"),
    ("[1, 2]", "sft", "expected a JSON object", "invalid row"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "sft", "message 0 must be", "invalid row"),
    ({"messages": [QA[0], {"role": "assistant", "content": 5}]}, "sft", "message 1 must be", "invalid row"),
    ({"text": "no messages"}, "sft", "'messages' must be a non-empty list", "invalid row"),
    ({"messages": []}, "sft", "'messages' must be a non-empty list", "invalid row"),
    ({"messages": [QA[0]]}, "sft", "no assistant message, so nothing to learn", "invalid row"),
    (
        {"messages": [QA[0], {"role": "assistant", "content": "  "}]},
        "sft",
        "an assistant message is empty",
        "empty response",
    ),
    ('{"prompt": "Q?", "chosen": "5", "rejected": 6', "dpo", "malformed JSON", "malformed JSON"),
    ({"chosen": "5", "rejected": "6"}, "dpo", "needs a non-empty 'prompt' text or a 'messages' list", "invalid row"),
    ({"prompt": "", "chosen": "5", "rejected": "6"}, "dpo", "needs a non-empty 'prompt'", "invalid row"),
    (
        {"messages": [{"role": "robot", "content": "Q?"}], "chosen": "5", "rejected": "6"},
        "dpo",
        "message 0 must be",
        "invalid row",
    ),
    ({"prompt": "Q?", "chosen": 5, "rejected": "6"}, "dpo", "'chosen' must be the response text", "invalid row"),
    ({"prompt": "Q?", "chosen": "5"}, "dpo", "'rejected' must be the response text", "invalid row"),
    (
        {"prompt": "Q?", "chosen": "5", "rejected": "5"},
        "dpo",
        "chosen and rejected are the same text",
        "chosen equals rejected",
    ),
    (
        {"prompt": "Q?", "chosen": " 5\n", "rejected": "5"},
        "dpo",
        "chosen and rejected are the same text",
        "chosen equals rejected",
    ),
    ({"prompt": "Q?", "chosen": "", "rejected": "5"}, "dpo", "'chosen' is empty", "empty response"),
    (
        {"prompt": "Q?", "chosen": "5", "rejected": [{"role": "assistant", "content": " "}]},
        "dpo",
        "'rejected' is empty",
        "empty response",
    ),
]


@pytest.mark.parametrize("row,kind,message,problem", BAD, ids=[f"{b[1]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_rows_stop_naming_file_and_line_or_are_skipped_and_counted(tmp_path, tok, row, kind, message, problem):
    good = GOOD[kind]
    rows = [good, "", row, good]  # the bad row is on line 3 of the file (the blank line 2 still counts)
    path = tmp_path / "d.jsonl"
    with pytest.raises(UserError) as e:
        _load(tmp_path, tok, rows, kind=kind)
    text = str(e.value)
    assert text.startswith(f"{path}:3: ") and message in text
    assert text.endswith("; fix that line, or set data.bad_rows=skip to drop and count such rows")
    examples, counts = _load(tmp_path, tok, rows, kind=kind, bad_rows="skip")
    assert dict(counts) == {"lines": 3, "examples": 2, f"skipped: {problem}": 1}
    expected, _ = _load(tmp_path, tok, [good, good], kind=kind)
    assert examples == expected


def test_strict_stops_at_the_first_bad_row_and_skip_counts_every_kind(tmp_path, tok):
    rows = [
        GOOD["dpo"],
        "{oops",
        {"prompt": "Q?", "chosen": "5", "rejected": "5"},
        GOOD["dpo"],
        {"prompt": "Q?", "chosen": "", "rejected": "5"},
        {"chosen": "5", "rejected": "6"},
        "nope",
        {"prompt": "Q?", "chosen": "5", "rejected": " 5"},
    ]
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'd.jsonl'}:2: malformed JSON (")):
        _load(tmp_path, tok, rows, kind="dpo")
    _, counts = _load(tmp_path, tok, rows, kind="dpo", bad_rows="skip")
    assert dict(counts) == {
        "lines": 8,
        "examples": 2,
        "skipped: malformed JSON": 2,
        "skipped: invalid row": 1,
        "skipped: empty response": 1,
        "skipped: chosen equals rejected": 2,
    }
    # the same file as SFT data: the DPO rows lack 'messages' (or are malformed)
    _, sft_counts = _load(tmp_path, tok, rows, kind="sft", bad_rows="skip")
    assert dict(sft_counts) == {"lines": 8, "examples": 0, "skipped: malformed JSON": 2, "skipped: invalid row": 6}


@pytest.mark.parametrize("bad_rows", ["strict", "skip"])
def test_lone_surrogate_text_is_a_bad_row(tmp_path, tok, bad_rows):
    rows = [
        GOOD["sft"],
        r'{"messages": [{"role": "user", "content": "a\ud800"}, {"role": "assistant", "content": "5"}]}',
    ]
    if bad_rows == "strict":
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'd.jsonl'}:2: text that is not valid Unicode")):
            _load(tmp_path, tok, rows)
    else:
        examples, counts = _load(tmp_path, tok, rows, bad_rows="skip")
        assert len(examples) == 1 and counts["skipped: invalid row"] == 1 and counts["examples"] == 1


def test_crlf_files_name_the_right_line(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD["sft"], "", GOOD["sft"], '{"messages": 3}'], newline="\r\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:4: 'messages' must be a non-empty list")):
        load_examples([path], "sft", tok, 65, "strict", "unused")


# ------------------------------------------------------------------------------------------------
# Truncation


def test_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tok, sp):
    short = {"messages": QA}
    late = {"messages": [{"role": "user", "content": "word " * 80}, QA[1]]}  # the answer starts past 65 tokens
    long = {"messages": [QA[0], {"role": "assistant", "content": "word " * 80}]}
    examples, counts = _load(tmp_path, tok, [short, late, long, late])
    assert dict(counts) == {
        "lines": 4,
        "examples": 2,
        "truncated to the context": 1,
        "dropped: no response token within the context": 2,
    }
    full_ids, full_w = _expected(tok, sp, long["messages"])
    assert len(full_ids) > 65
    assert examples == [_expected(tok, sp, QA), (full_ids[:65], full_w[:65])]


def test_truncation_boundary_is_the_first_response_token(tmp_path, tok, sp):
    ids, weights = _expected(tok, sp, QA)
    first = weights.index(1.0)  # the answer's first token
    cases = {
        len(ids): ([(ids, weights)], {}),  # fits exactly: not truncated
        first + 1: ([(ids[: first + 1], weights[: first + 1])], {"truncated to the context": 1}),
        first: ([], {"dropped: no response token within the context": 1}),
    }
    for length, (expected, extra) in cases.items():
        examples, counts = _load(tmp_path, tok, [{"messages": QA}], length=length)
        assert examples == expected, length
        assert dict(counts) == {"lines": 1, "examples": len(expected), **extra}, length


def test_dpo_truncation_keeps_the_pair_or_drops_it(tmp_path, tok, sp):
    prefix = [tok.eos_id, *_turn(tok, sp, "user", Q), sp["assistant"]]
    rows = [
        {"prompt": Q, "chosen": "5", "rejected": "word " * 80},  # the rejected one is cut
        {"prompt": "word " * 80, "chosen": "5", "rejected": "6"},
    ]  # the prompt fills the context
    examples, counts = _load(tmp_path, tok, rows, kind="dpo", length=40)
    assert dict(counts) == {
        "lines": 2,
        "examples": 1,
        "truncated to the context": 1,
        "dropped: no response token within the context": 1,
    }
    [((c_ids, _), (r_ids, r_w))] = examples
    assert c_ids == prefix + tok.encode("5") + [sp["end_of_turn"]]
    full = prefix + tok.encode("word " * 80) + [sp["end_of_turn"]]
    assert r_ids == full[:40] and r_w == [0.0] * len(prefix) + [1.0] * (40 - len(prefix))


# ------------------------------------------------------------------------------------------------
# The array source and the grain loaders


def _write_split(data_dir, split, n):
    """Arrays whose every value encodes its row index, so rows can be traced through batches."""
    rows = np.arange(n)
    arrays = {
        "tokens": (rows[:, None] * 10 + np.arange(5)).astype(np.int32),
        "segments": np.repeat(rows[:, None] % 3 + 1, 5, axis=1).astype(np.int32),
        "weights": np.repeat(rows[:, None] + 0.5, 4, axis=1).astype(np.float32),
    }
    for name, a in arrays.items():
        save_array(data_dir / f"{split}.{name}.npy", a)
    return arrays


def test_example_rows_serve_row_i_of_every_array_of_the_split(tmp_path):
    train = _write_split(tmp_path, "train", 10)
    _write_split(tmp_path, "val", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}.{n}.npy" for s in ("train", "val") for n in ("tokens", "segments", "weights")
    )  # no temp files left
    rows = ExampleRows(tmp_path, "train")
    assert len(rows) == 10 and len(ExampleRows(tmp_path, "val")) == 3
    for i in range(10):
        item = rows[i]
        assert set(item) == {"tokens", "segments", "weights"}
        for name, a in train.items():
            assert item[name].dtype == a.dtype and np.array_equal(item[name], a[i])
    assert rows[np.int64(7)]["tokens"].tolist() == [70, 71, 72, 73, 74]
    assert repr(rows) == f"ExampleRows({tmp_path}, ['segments', 'tokens', 'weights'])"
    again = pickle.loads(pickle.dumps(rows))  # grain may hand the source to workers
    assert len(again) == 10 and np.array_equal(again[3]["weights"], train["weights"][3])


def test_train_iterator_batches_example_rows_deterministically(tmp_path):
    train = _write_split(tmp_path, "train", 10)
    rows = ExampleRows(tmp_path, "train")

    def epoch(seed, batch=5, **host):
        it = train_iterator(rows, batch, seed=seed, **host)
        return [next(it) for _ in range(10 // batch * 2)]  # two epochs

    a, b, c = epoch(1), epoch(1), epoch(2)
    for batch in a:
        assert set(batch) == {"tokens", "segments", "weights"}
        assert batch["tokens"].shape == (5, 5) and batch["segments"].shape == (5, 5)
        assert batch["weights"].shape == (5, 4) and batch["weights"].dtype == np.float32
        index = batch["tokens"][:, 0] // 10  # the rows of one batch item stay together
        np.testing.assert_array_equal(batch["tokens"], train["tokens"][index])
        np.testing.assert_array_equal(batch["segments"], train["segments"][index])
        np.testing.assert_array_equal(batch["weights"], train["weights"][index])
    order = lambda batches: [int(t) // 10 for x in batches for t in x["tokens"][:, 0]]  # noqa: E731
    assert order(a) == order(b)  # same seed, same stream
    assert order(a) != order(c)  # another seed, another order
    assert sorted(order(a)[:10]) == sorted(order(a)[10:]) == list(range(10))  # each epoch sees every row once
    # two hosts, global batch 2: host p reads rows p, p + 2, ... of the one-host stream, one row a batch
    one = order(epoch(1, batch=2))
    host0, host1 = epoch(1, 2, process_index=0, process_count=2), epoch(1, 2, process_index=1, process_count=2)
    assert [x["tokens"].shape for x in host0] == [(1, 5)] * 10
    assert order(host0) == one[0::2] and order(host1) == one[1::2]
    assert one == order(a)  # the stream does not depend on the batch size
    with pytest.raises(UserError, match=re.escape("train.batch_size=5 must be divisible by the 2 hosts")):
        train_iterator(rows, 5, seed=1, process_index=0, process_count=2)
    with pytest.raises(
        UserError, match=re.escape(f"the training split has 10 rows ({rows!r}), fewer than train.batch_size=11")
    ):
        train_iterator(rows, 11, seed=1)


def test_eval_batches_pad_the_last_batch_with_zero_rows(tmp_path):
    val = _write_split(tmp_path, "val", 5)
    rows = ExampleRows(tmp_path, "val")
    batches = list(eval_batches(rows, batch=4, max_batches=2))
    assert len(batches) == 2 and all(set(b) == {"tokens", "segments", "weights"} for b in batches)
    assert [b["tokens"].shape for b in batches] == [(4, 5), (4, 5)]
    for name, a in val.items():
        np.testing.assert_array_equal(batches[0][name], a[:4])
        np.testing.assert_array_equal(batches[1][name][:1], a[4:])
        assert not batches[1][name][1:].any()  # three blank rows: tokens, segments and weights all zero
    assert batches[1]["weights"].sum() == val["weights"][4].sum() == 4 * 4.5
    # fewer batches than the split: every len // n-th row, in order
    spread = list(eval_batches(rows, batch=2, max_batches=1))
    assert len(spread) == 1 and (spread[0]["tokens"][:, 0] // 10).tolist() == [0, 2]


# ------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_chat_sources_must_be_jsonl(tmp_path, tok, kind):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        UserError, match=re.escape(f"{tmp_path / 'notes.txt'}: {kind} data must be .jsonl (one JSON object per line)")
    ):
        load_examples([str(tmp_path / "notes.txt")], kind, tok, 65, "strict", "unused")
    # a directory holding a .txt next to the .jsonl is refused too, naming the .txt
    _jsonl(tmp_path / "a.jsonl", [GOOD[kind]])
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'notes.txt'}: {kind} data must be .jsonl")):
        load_examples([str(tmp_path)], kind, tok, 65, "strict", "unused")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        load_examples([str(tmp_path / "data.csv")], kind, tok, 65, "strict", "unused")
    with pytest.raises(UserError, match="does not exist"):
        load_examples([str(tmp_path / "missing.jsonl")], kind, tok, 65, "strict", "unused")
