"""llm-jax eval (perplexity, multiple choice, generation) and llm-jax judge (against a real llm-jax serve)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.cli import main
from llm_jax.errors import UserError
from llm_jax.evals import judge as J
from llm_jax.evals.harness import run_eval
from llm_jax.evals.tasks import bundled_names, load_task
from llm_jax.inference.generate import Generator
from llm_jax.model.transformer import Transformer
from llm_jax.run import load_run
from llm_jax.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_slice):
    """The tiny model with a 512-token context, so that a judge prompt with two answers fits."""
    run = tmp_path_factory.mktemp("evals") / "run"
    train(
        tiny_config(run, "model.seq_len=512", "train.steps=30", "train.eval_every=30", sources=corpus_slice),
        log=lambda *_: None,
    )
    return run


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _logp(model, params, ids):
    """Sum of log p(ids[1:]) in one unpadded forward pass, and the per-token values."""
    hidden, _ = model.apply({"params": params}, jnp.asarray([ids[:-1]]))
    per = np.asarray(model.apply({"params": params}, hidden, jnp.asarray([ids[1:]]), method=Transformer.token_logps))[0]
    return per


def test_bundled_tasks_load_and_bad_rows_name_file_and_line(tmp_path):
    assert bundled_names() == ["shakespeare_cloze", "shakespeare_next_word", "shakespeare_speaker"]
    speaker = load_task("shakespeare_speaker")
    assert speaker.kind == "choice" and len(speaker.rows) == 200 and len(load_task("shakespeare_cloze", 10).rows) == 10
    assert load_task("shakespeare_next_word").kind == "generate"
    bad = [
        ('{"context": "a", "choices": ["x"], "gold": 0}', ":1: 'choices' must be a list of at least 2"),
        ('{"context": "a", "choices": ["x", "y"], "gold": 2}', ":1: 'gold' must be the index"),
        ('{"prompt": "a"}', ":1: a row needs 'choices' and 'gold'"),
        ('{"prompt": "a", "answer": "b", "regex": "("}', ":1: bad 'regex'"),
        ('{"messages": [{"role": "robot", "content": "x"}], "answer": "b"}', ":1: message 0 must be"),
        ('{"prompt": "a", "answer": "b", "max_tokens": 0}', ":1: 'max_tokens' must be a positive integer"),
    ]
    for i, (row, message) in enumerate(bad):
        with pytest.raises(UserError, match=f"t{i}.jsonl{message}"):
            load_task(_write(tmp_path / f"t{i}.jsonl", [row]))
    with pytest.raises(UserError, match=r"m.jsonl:2: malformed JSON"):
        load_task(_write(tmp_path / "m.jsonl", ['{"prompt": "a", "answer": "b"}', '{"prompt": ']))
    with pytest.raises(UserError, match="neither a bundled task"):
        load_task("no_such_task")
    with pytest.raises(UserError, match="mixes multiple-choice and generation"):
        load_task(
            _write(
                tmp_path / "x.jsonl",
                ['{"prompt": "a", "answer": "b"}', '{"context": "a", "choices": ["x", "y"], "gold": 0}'],
            )
        )


@pytest.mark.slow
def test_scores_match_direct_computation(run, tmp_path):
    loaded = load_run(str(run))
    cfg, params, tok, step_dir = loaded.cfg, loaded.params, loaded.tokenizer, loaded.step_dir
    model = Transformer(cfg.model)
    contexts = ["Enter Kent.\n", "KING.\nWhat says", "To be, or not"]
    choices = [" the king", " Romeo", "\nGood", " my lord,"]
    best, worst = [], []
    for c in contexts:
        ctx = [tok.eos_id] + tok.encode(c)
        scores = [_logp(model, params, ctx + tok.encode(ch))[-len(tok.encode(ch)) :].sum() for ch in choices]
        best.append(int(np.argmax(scores)))
        worst.append(int(np.argmin(scores)))
    mc = [{"context": c, "choices": choices, "gold": g, "task": "best"} for c, g in zip(contexts, best)]
    mc += [{"context": c, "choices": choices, "gold": g, "task": "worst"} for c, g in zip(contexts, worst)]

    gen = Generator(cfg.model, params)
    prompts = ["Romeo.\n", "Enter", "KING.\nWhat"]
    own = [tok.decode(list(gen.stream([tok.eos_id] + tok.encode(p), 6, stop_ids=(tok.eos_id,)))) for p in prompts]
    rows = [{"prompt": p, "answer": o, "max_tokens": 6, "task": "own"} for p, o in zip(prompts, own)]
    rows += [{"prompt": p, "answer": "zzz", "max_tokens": 6, "task": "wrong"} for p in prompts]
    first_word = [next(iter(o.split()), "") for o in own]
    rows += [
        {"prompt": p, "answer": w, "max_tokens": 6, "regex": r"(\S+)", "task": "regex"}
        for p, w in zip(prompts, first_word)
    ]

    text = "Good morrow, cousin. " * 150  # longer than one 512-token window
    (tmp_path / "doc.txt").write_text(text)
    record = run_eval(
        str(run),
        [_write(tmp_path / "mc.jsonl", mc), _write(tmp_path / "gen.jsonl", rows), f"ppl:{tmp_path / 'doc.txt'}"],
        out=str(tmp_path / "r.json"),
        log=lambda *_: None,
    )
    res = record["results"]
    assert (res["mc"]["best"]["acc"], res["mc"]["worst"]["acc"], res["mc"]["all"]["n"]) == (1.0, 0.0, 6)
    assert (
        res["gen"]["own"]["exact_match"],
        res["gen"]["wrong"]["exact_match"],
        res["gen"]["regex"]["exact_match"],
    ) == (1.0, 0.0, 1.0)
    ids = [tok.eos_id] + tok.encode(text)
    assert len(ids) > cfg.model.seq_len + 1
    ppl = res[f"ppl:{tmp_path / 'doc.txt'}"]["all"]
    assert ppl["tokens"] == len(ids) - 1
    # windows of seq_len + 1 overlapping by one token: each token scored once, with its window's context
    nll = -sum(
        _logp(model, params, ids[s : s + cfg.model.seq_len + 1]).sum()
        for s in range(0, len(ids) - 1, cfg.model.seq_len)
    )
    assert math.isclose(ppl["loss"], nll / (len(ids) - 1), rel_tol=1e-4)
    assert math.isclose(ppl["bpb"], nll / math.log(2) / len(text.encode()), rel_tol=1e-4)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["step"] == int(step_dir.name) == 30 and saved["config"]["model"]["d_model"] == cfg.model.d_model


def test_eval_cli_table_and_bad_input(run, tmp_path, capsys):
    main(["eval", "--run", str(run), "--tasks", "shakespeare_cloze", "shakespeare_next_word", "--limit", "8"])
    out = capsys.readouterr().out
    assert "shakespeare_cloze" in out and "acc_norm" in out and "exact_match" in out
    assert (run / "eval" / "step30.json").is_file()
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(run), "--tasks", str(tmp_path / "missing.jsonl")])
    assert "neither a bundled task" in capsys.readouterr().err


def test_verdicts_position_swap_and_summary():
    assert [J.parse_verdict(r) for r in ("Verdict: A", "verdict: [[B]]", "Verdict: tie.", "I like A")] == [
        "A",
        "B",
        "tie",
        None,
    ]
    assert [J.parse_rating(r) for r in ("Rating: [[7]]", "Rating: [[10]]", "seven")] == [7, 10, None]
    # first: A shown first; swapped: B shown first, so its "B" means our A
    assert J.pairwise_outcome("A", "B") == "A" and J.pairwise_outcome("B", "A") == "B"
    assert J.pairwise_outcome("A", "A") == "tie"  # always picks the first position: position bias, cancelled
    assert J.pairwise_outcome("tie", "tie") == "tie" and J.pairwise_outcome(None, "A") == "invalid"
    rows = [{"outcome": o} for o in ("A", "A", "B", "tie", "invalid")]
    assert J.summarize(rows, "pairwise") == {"n": 5, "A": 2, "B": 1, "tie": 1, "invalid": 1, "win_rate_a": 0.625}


@pytest.mark.slow
def test_judge_against_llm_jax_serve_keeps_partial_results(run, tmp_path):
    from test_server import _start

    questions = _write(tmp_path / "q.jsonl", [{"question": f"Who is Kent? ({i})"} for i in range(3)])
    other = _write(tmp_path / "b.jsonl", [{"answer": "A lord."}] * 3)
    proc, port = _start(run, tmp_path / "server.log", "--max-batch", "4")
    try:
        endpoint = J.Endpoint(f"http://127.0.0.1:{port}/v1", "tiny-chat", None, max_tokens=16)
        lines = []
        summary = J.judge(
            questions, str(run), other, endpoint, str(tmp_path / "j.jsonl"), max_tokens=8, log=lines.append
        )
        single = J.judge(questions, other, None, endpoint, str(tmp_path / "s.jsonl"), log=lambda *_: None)
    finally:
        proc.terminate()
        proc.wait(30)
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["replies"]) == 2 and isinstance(r["replies"][0], str) for r in rows)
    assert summary["n"] == 3 and sum(summary[k] for k in ("A", "B", "tie", "invalid")) == 3
    assert "win rate of A" in lines[0] and single["n"] == 3
    # more questions, judge gone: the 3 judged stay, the error names the endpoint and the count
    more = _write(tmp_path / "q5.jsonl", [{"question": f"Who is Kent? ({i})"} for i in range(5)])
    dead = J.Endpoint(f"http://127.0.0.1:{port}/v1", "tiny-chat", None, timeout=5)
    with pytest.raises(UserError, match=rf"127.0.0.1:{port}/v1/chat/completions is unreachable.*3 of 5 questions"):
        J.judge(
            more,
            str(run),
            _write(tmp_path / "b5.jsonl", [{"answer": "A lord."}] * 5),
            dead,
            str(tmp_path / "j.jsonl"),
            max_tokens=8,
        )
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 3
    with pytest.raises(UserError, match="has 3 answers for 5 questions"):
        J.judge(more, other, None, dead, str(tmp_path / "x.jsonl"))
