"""data.mixture (llm_jax/data/mixture.py): shares that track the weights, a schedule that switches at its
step, exact resumption, per-host rows, and a mixture trained end to end with validation per part."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.config import load_config
from llm_jax.config.mixture import parse_mixture
from llm_jax.data.loader import train_iterator
from llm_jax.data.mixture import Mixture
from llm_jax.errors import UserError


def _mixture(*entries: str, sizes=None) -> Mixture:
    """Parts whose rows are {"tokens": [part, index]}: which part and which of its rows each batch row is."""
    parts = parse_mixture(entries)
    sizes = sizes or [1000] * len(parts)
    return Mixture(parts, [[{"tokens": np.array([i, j])} for j in range(n)] for i, n in enumerate(sizes)])


def _parts_of(batches) -> np.ndarray:
    return np.array([b["tokens"][:, 0] for b in batches])  # [steps, rows]


def test_realised_shares_track_the_weights_within_a_row_over_10k_windows():
    it = train_iterator(_mixture("web:0.6=a", "code:0.3=b", "math:0.1=c"), 8, seed=0)
    parts = _parts_of(next(it) for _ in range(1250))  # 10,000 windows
    shares = np.bincount(parts.ravel(), minlength=3) / parts.size
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=1e-4)  # one row in 10,000
    cumulative = np.cumsum([np.bincount(p, minlength=3) for p in parts], axis=0)  # after every step
    owed = np.arange(1, 1251)[:, None] * 8 * np.array([0.6, 0.3, 0.1])
    assert np.abs(cumulative - owed).max() < 1.0
    assert it.shares() == pytest.approx({"web": 0.6, "code": 0.3, "math": 0.1}, abs=1e-4)


def test_a_weight_schedule_switches_at_the_step_it_names():
    it = train_iterator(_mixture("a:1/0@50/0.5@100=x", "b:0/1@50/0.5@100=y"), 8, seed=1)
    parts = _parts_of(next(it) for _ in range(120))
    assert (parts[:49] == 0).all() and (parts[49:99] == 1).all()  # steps 1-49 all a, 50-99 all b
    assert (parts[99:] == 0).sum() == (parts[99:] == 1).sum() == 21 * 4  # then half and half, every step


def test_each_part_continues_its_own_shuffled_order_and_repeats_alone():
    it = train_iterator(_mixture("big:0.5=x", "small:0.5=y", sizes=[1000, 6]), 4, seed=2)
    rows = np.concatenate([next(it)["tokens"] for _ in range(30)])  # 60 rows of each part
    big, small = rows[rows[:, 0] == 0, 1], rows[rows[:, 0] == 1, 1]
    assert len(set(big.tolist())) == 60  # no row of the large part twice in its first epoch
    assert sorted(small[:6].tolist()) == list(range(6)) and len(set(small.tolist())) == 6  # the small one repeats


def test_the_iterator_resumes_exactly_and_hosts_read_their_rows_of_each_step():
    mixture = _mixture("a:0.7/0.2@6=x", "b:0.3/0.8@6=y")
    it = train_iterator(mixture, 8, seed=3)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    want = [next(it)["tokens"] for _ in range(5)]
    resumed = train_iterator(mixture, 8, seed=3)
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(resumed)["tokens"], w)
    hosts = [train_iterator(mixture, 8, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    single = train_iterator(mixture, 8, seed=3)
    for _ in range(9):
        whole = next(single)["tokens"]
        np.testing.assert_array_equal(next(hosts[0])["tokens"], whole[0::2])
        np.testing.assert_array_equal(next(hosts[1])["tokens"], whole[1::2])
    with pytest.raises(UserError, match="has 3 mixture parts, data.mixture 2"):
        resumed.set_state({"step": 1, "done": [1, 2, 3]})


@pytest.mark.parametrize(
    "entry, message",
    [
        ("web:0.7", "no NAME:WEIGHT= before the sources"),
        ("Web:1=x", "name 'Web' must be lowercase letters, digits and _"),
        ("web:0.5@10=x", "the first without @STEP and the others at rising steps > 1"),
        ("web:1/0.5@20/0.2@10=x", "the first without @STEP and the others at rising steps > 1"),
        ("web:heavy=x", "'heavy' is not WEIGHT or WEIGHT@STEP"),
        ("web:1/0@5=x", "every weight from step 5 on is 0"),
    ],
)
def test_bad_mixture_entries_get_one_line_naming_the_form(entry, message):
    with pytest.raises(UserError, match="invalid config") as error:
        load_config("tiny", [f"data.mixture=[{entry}]"])
    assert message in str(error.value)


def _documents(path: Path, texts: list[str], size: int = 1500) -> str:
    """The texts cut into ~size-character documents at blank lines, one JSON line each."""
    docs, current = [], ""
    for paragraph in "\n\n".join(texts).split("\n\n"):
        current += paragraph + "\n\n"
        if len(current) > size:
            docs, current = docs + [current], ""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


@pytest.mark.slow
def test_a_mixture_trains_resumes_exactly_and_reports_each_part(tmp_path, corpus_slice):
    from llm_jax.train.loop import train

    plays = _documents(tmp_path / "plays.jsonl", [Path(p).read_text() for p in corpus_slice[:4]])
    poems = _documents(tmp_path / "poems.jsonl", [Path(corpus_slice[4]).read_text()])
    mixture = f"data.mixture=[plays:0.75/0.25@7={plays}, poems:0.25/0.75@7={poems}]"
    common = [mixture, "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=1"]
    lines = []
    whole = train(tiny_config(tmp_path / "whole", *common, "train.steps=12"), log=lines.append)
    assert {"bpb/plays", "bpb/poems", "loss/plays", "loss/poems"} <= set(whole)
    assert any("| plays bpb " in line and "| poems bpb " in line for line in lines)
    rows = [json.loads(r) for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "share/plays" in r]
    assert train_rows[5]["share/plays"] == pytest.approx(0.75)  # 36 of 48 rows after 6 steps
    assert train_rows[11]["share/plays"] == pytest.approx(0.5)  # then 0.25 for 6 steps: 48 of 96
    report = json.loads((tmp_path / "whole" / "data" / "report.json").read_text())
    assert set(report["mixture"]) == {"plays", "poems"} and report["mixture"]["poems"]["train_tokens"] > 0

    train(tiny_config(tmp_path / "halves", *common, "train.steps=6"), log=lambda *_: None)
    resumed = train(tiny_config(tmp_path / "halves", *common, "train.steps=12"), log=lambda *_: None)
    assert resumed == pytest.approx(whole, rel=1e-6)  # the iterator's state came back from the checkpoint


def test_validation_sources_beside_a_mixture_validate_the_whole(tmp_path, corpus_slice):
    """data.val_sources belong to no part: they are the overall validation split, the parts get none of their own."""
    from llm_jax.train.objectives import prepare_data

    plays = _documents(tmp_path / "plays.jsonl", [Path(p).read_text() for p in corpus_slice[:2]])
    poems = _documents(tmp_path / "poems.jsonl", [Path(corpus_slice[4]).read_text()])
    held = _documents(tmp_path / "held.jsonl", [Path(corpus_slice[2]).read_text()])
    mixture = f"data.mixture=[plays:0.5={plays}, poems:0.5={poems}]"
    cfg = tiny_config(tmp_path / "run", mixture, f"data.val_sources=[{held}]")
    (tmp_path / "run").mkdir()
    data = prepare_data(cfg, tmp_path / "run", log=lambda *_: None)
    assert len(data.val) > 0 and not data.val_parts and [p.name for p in data.train.parts] == ["plays", "poems"]
