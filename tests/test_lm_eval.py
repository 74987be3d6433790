"""lm-evaluation-harness with llm_jax as its model (`llm_jax.evals.lm_eval_model`): in process through
`llm-jax eval --lm-eval`, and through lm-eval's own command line; a local task YAML and data file."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import lm_eval_samples, lm_eval_task_dir, tiny_config

from llm_jax.cli import main
from llm_jax.evals.harness import Scorer, choice_scores, greedy_outputs, multiple_choice
from llm_jax.inference.generate import Generator
from llm_jax.run import load_run
from llm_jax.train.loop import train

pytest.importorskip("lm_eval")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_slice):
    run = tmp_path_factory.mktemp("lm_eval") / "run"
    train(tiny_config(run, "train.steps=20", "train.eval_every=20", sources=corpus_slice), log=lambda *_: None)
    return run


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return lm_eval_task_dir(tmp_path_factory.mktemp("tasks"))


def _ours(run):
    loaded = load_run(str(run))
    rows = [json.loads(line) for line in (DATA / "lm_eval_choice.jsonl").read_text().splitlines()]
    rows = [{"context": r["question"], "choices": r["choices"], "gold": r["answer"], "task": "t"} for r in rows]
    scorer = Scorer(loaded.cfg.model, loaded.params)
    return loaded, rows, choice_scores(scorer, loaded.tokenizer, rows), multiple_choice(scorer, loaded.tokenizer, rows)


def test_llm_jax_eval_lm_eval_scores_a_local_task_as_our_harness_does(run, tasks, tmp_path, capsys):
    out = tmp_path / "record.json"
    main(["eval", "--run", str(run), "--lm-eval", "llm_jax_choice", "--lm-eval-include", str(tasks)])
    main(["eval", "--run", str(run), "--lm-eval", "llm_jax_choice", "--lm-eval-include", str(tasks), "--out", str(out)])
    assert "llm_jax_choice" in capsys.readouterr().out
    record = json.loads(out.read_text())
    _, rows, _, ours = _ours(run)
    assert record["results"]["llm_jax_choice"]["acc,none"] == ours["all"]["acc"] and len(rows) == 8
    assert (Path(run) / "eval" / f"lm_eval_step{record['step']}.json").is_file()


def test_the_model_class_matches_our_log_likelihoods_greedy_flags_and_generations(run):
    from lm_eval.api.instance import Instance

    from llm_jax.evals.lm_eval_model import LlmJaxLM

    lm = LlmJaxLM.create_from_arg_string(f"run={run},mesh=2x1x2,batch_size=4")
    loaded, rows, scores, _ = _ours(run)

    def request(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    pairs = [(r["context"], c) for r in rows for c in r["choices"]]
    got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
    np.testing.assert_allclose([g[0] for g in got], [s for row in scores for s in row], atol=1e-4)
    tok, generator = loaded.tokenizer, Generator(loaded.cfg.model, loaded.params)  # one: its steps compile once
    for (context, choice), (_, greedy) in zip(pairs, got):  # greedy: each choice token is the argmax
        ids = [tok.bos_id] + tok.encode(context) + tok.encode(choice)
        hidden_best = generator.stream(ids[: -len(tok.encode(choice))], len(tok.encode(choice)))
        assert greedy == (list(hidden_best) == tok.encode(choice))

    text = "To be, or not to be, that is the question."
    rolling = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])[0]
    np.testing.assert_allclose(
        rolling, choice_scores(lm.scorer, tok, [{"context": "", "choices": [text]}])[0][0], atol=1e-4
    )

    asks = [("ROMEO.\n", {"until": ["\n\n"], "max_gen_toks": 12}), ("KING.\n", {"until": "ROMEO", "max_gen_toks": 8})]
    expected = greedy_outputs(
        loaded.cfg.model,
        tok,
        [
            {
                "prompt": c,
                "max_tokens": k["max_gen_toks"],
                "stop": [k["until"]] if isinstance(k["until"], str) else k["until"],
            }
            for c, k in asks
        ],
        generator,
    )
    assert lm.generate_until([request("generate_until", a) for a in asks]) == expected and any(expected)


def test_lm_evals_own_command_line_runs_the_llm_jax_model(run, tasks, tmp_path):
    samples = lm_eval_samples("llm_jax.evals.lm_eval_model", "llm_jax", f"run={run},mesh=2x1x1", tasks, tmp_path)
    _, _, scores, _ = _ours(run)
    np.testing.assert_allclose([[float(r[0][0]) for r in s["resps"]] for s in samples], scores, atol=1e-4)


def test_an_unknown_lm_eval_task_gets_one_line(run, tasks, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(run), "--lm-eval", "hellaswagg", "--lm-eval-include", str(tasks)])
    err = capsys.readouterr().err.strip()
    assert "lm-eval knows no task hellaswagg" in err and len(err.splitlines()) == 1
