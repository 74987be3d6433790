"""SFT / DPO example building: weights, packing, padding, truncation, bad rows and the sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_jax.chat import render, special_ids
from llm_jax.data.chat_data import ExampleRows, load_examples, pack_sft, pad_dpo, save_array
from llm_jax.data.loader import eval_batches, train_iterator
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError

QA = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.fixture(scope="module")
def tok(prepared_template) -> Tokenizer:
    return Tokenizer(prepared_template / "tokenizer.model")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _load(tmp_path, tok, rows, kind="sft", length=65, bad_rows="strict"):
    return load_examples([_jsonl(tmp_path / "d.jsonl", rows)], kind, tok, length, bad_rows, "unused")


def test_packing_keeps_examples_whole_and_apart(tmp_path, tok):
    long_answer = {"messages": [QA[0], {"role": "assistant", "content": "five " * 6}]}
    examples, counts = _load(tmp_path, tok, [{"messages": QA}, long_answer, {"messages": QA}])
    assert counts["lines"] == counts["examples"] == 3
    lengths = [len(ids) for ids, _ in examples]
    length = lengths[0] + lengths[1]  # the first two fill row 0 exactly; the third starts row 1
    packed = pack_sft(examples, length)
    assert packed["tokens"].shape == (2, length) and packed["weights"].shape == (2, length - 1)
    assert packed["segments"][0].tolist() == [1] * lengths[0] + [2] * lengths[1]
    assert packed["segments"][1].tolist() == [1] * lengths[2] + [0] * (length - lengths[2])
    assert packed["tokens"][0].tolist() == examples[0][0] + examples[1][0]
    token_w = np.concatenate([[0.0], packed["weights"][0]])  # weights[:, j] belongs to target tokens[:, j + 1]
    assert token_w.tolist() == examples[0][1] + examples[1][1]
    assert token_w[lengths[0]] == 0  # the next example's first token (EOS) is never a trained target
    assert packed["weights"].sum() == sum(sum(w) for _, w in examples)


def test_dpo_pairs_share_the_prompt_and_train_only_the_response(tmp_path, tok):
    rows = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"messages": [QA[0]], "chosen": [{"role": "assistant", "content": "5"}], "rejected": "4"}]
    (c0, r0), (c1, r1) = _load(tmp_path, tok, rows, kind="dpo")[0]
    prefix, _ = render(tok, [QA[0]], generation_prompt=True)
    end = special_ids(tok)["end_of_turn"]
    assert c0[0] == c1[0] == prefix + tok.encode("5") + [end] and r0[0] == prefix + tok.encode("6") + [end]
    assert c0[1] == [0.0] * len(prefix) + [1.0] * (len(c0[0]) - len(prefix))
    arrays = pad_dpo([(c0, r0)], 24)
    assert arrays["tokens"].shape == (1, 2, 24) and arrays["weights"].shape == (1, 2, 23)
    assert arrays["weights"][0, 0].sum() == 2 and arrays["weights"][0, 0, len(prefix) - 1] == 1  # "5", end of turn


@pytest.mark.parametrize("row,kind,problem", [
    ('{"messages": [', "sft", "malformed JSON"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "sft", "invalid row"),
    ({"text": "no messages"}, "sft", "invalid row"),
    ({"messages": [QA[0], {"role": "assistant", "content": "  "}]}, "sft", "empty response"),
    ({"prompt": "Q?", "chosen": "5", "rejected": "5"}, "dpo", "chosen equals rejected"),
    ({"prompt": "Q?", "chosen": "", "rejected": "5"}, "dpo", "empty response"),
])
def test_bad_rows_stop_with_file_and_line_or_are_counted(tmp_path, tok, row, kind, problem):
    good = {"messages": QA} if kind == "sft" else {"prompt": "Q?", "chosen": "5", "rejected": "6"}
    with pytest.raises(UserError, match=r"d\.jsonl:2: .*data\.bad_rows=skip"):
        _load(tmp_path, tok, [good, row, good], kind=kind)
    examples, counts = _load(tmp_path, tok, [good, row, good], kind=kind, bad_rows="skip")
    assert len(examples) == 2 and counts[f"skipped: {problem}"] == 1 and counts["lines"] == 3


def test_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    short = {"messages": QA}
    late = {"messages": [{"role": "user", "content": "word " * 80}, QA[1]]}  # the answer starts past 65 tokens
    long = {"messages": [QA[0], {"role": "assistant", "content": "word " * 80}]}
    examples, counts = _load(tmp_path, tok, [short, late, long])
    assert counts["dropped: no response token within the context"] == 1
    assert counts["truncated to the context"] == 1 and counts["examples"] == 2
    assert len(examples[1][0]) == 65 and examples[1][0] == render(tok, long["messages"])[0][:65]


def test_example_rows_feed_the_grain_loaders(tmp_path):
    for split, n in (("train", 10), ("val", 5)):
        save_array(tmp_path / f"{split}.tokens.npy", np.arange(n * 3, dtype=np.int32).reshape(n, 3))
        save_array(tmp_path / f"{split}.weights.npy", np.ones((n, 2), np.float32))
    rows = ExampleRows(tmp_path, "train")
    assert len(rows) == 10 and rows[4]["tokens"].tolist() == [12, 13, 14] and set(rows[4]) == {"tokens", "weights"}
    batch = next(train_iterator(rows, 4, seed=1))
    again = next(train_iterator(rows, 4, seed=1))
    assert batch["tokens"].shape == (4, 3) and np.array_equal(batch["tokens"], again["tokens"])
    val = list(eval_batches(ExampleRows(tmp_path, "val"), batch=4, max_batches=2))
    assert [b["tokens"].shape for b in val] == [(4, 3), (4, 3)]
    assert val[1]["weights"].sum() == 2 and not val[1]["tokens"][1:].any()  # one real row, three blank ones


def test_chat_sources_must_be_jsonl(tmp_path, tok):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="sft data must be .jsonl"):
        load_examples([str(tmp_path / "notes.txt")], "sft", tok, 65, "strict", "unused")
