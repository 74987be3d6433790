"""lm-evaluation-harness's model interface (`lm_eval.api.model.LM`) over an llm_jax run, registered
as `llm_jax`:

    python -m llm_jax.evals.lm_eval_model run --model llm_jax --model_args run=runs/x[,mesh=2x1x4] --tasks ...
    llm-jax eval --run runs/x --lm-eval hellaswag,arc_easy [--lm-eval-include DIR]

(the first is lm-eval's own command line with this model registered; `lm_eval --model llm_jax`
alone cannot find a model that lm-eval does not ship). Log-likelihoods come from llm-jax eval's
scorer (one compiled shape, split over --mesh), so a multiple-choice task scores as our own harness
does: the context after the BOS and the continuation tokenized apart. Generation is greedy, batched.
Tasks that download data need network access and are the user's business.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llm_jax.errors import UserError
from llm_jax.evals.harness import Scorer, greedy_outputs
from llm_jax.inference.generate import Generator
from llm_jax.parallel.sharding import inference_layout
from llm_jax.run import eval_record_path, load_config_of, load_run


@register_model("llm_jax")
class LlmJaxLM(LM):
    def __init__(self, run: str, mesh: str = "1,1,1", batch_size: int | str = 16, max_gen_toks: int = 256, **_):
        super().__init__()
        # mesh=2x1x4 (lm-eval splits --model_args at commas) or 2,1,4
        layout = inference_layout(load_config_of(run), str(mesh).replace("x", ","))
        loaded = load_run(run, layout, inference=True)
        self.cfg, self.tokenizer, self.step = loaded.cfg, loaded.tokenizer, loaded.step
        self.batch = 16 if batch_size == "auto" else int(batch_size)
        self.scorer = Scorer(self.cfg.model, loaded.params, self.batch, layout)
        self.generator = Generator(self.cfg.model, loaded.params, layout)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        windows, spans = [], []
        for context, continuation in (r.args for r in requests):
            ids = self.tokenizer.encode(continuation)
            full = ([self.tokenizer.bos_id] + self.tokenizer.encode(context) + ids)[-self.scorer.width :]
            windows.append((full, [0] * len(full)))
            spans.append(min(len(ids), len(full) - 1))
        out = []
        for (logps, top), n in zip(self.scorer(windows, greedy=True), spans):
            out.append((float(logps[-n:].sum()) if n else 0.0, bool(top[-n:].all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's log-likelihood after the BOS, in windows of the context that overlap by one
        token (each token scored once; a window's first tokens see fewer before them)."""
        out = []
        for (text,) in (r.args for r in requests):
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
            step = self.scorer.width - 1
            windows = [
                (ids[s : s + self.scorer.width], [0] * len(ids[s : s + self.scorer.width]))
                for s in range(0, len(ids) - 1, step)
            ]
            out.append(float(sum(logps.sum() for logps in self.scorer(windows))))
        return out

    def generate_until(self, requests) -> list[str]:
        rows = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            rows.append(
                {
                    "prompt": context,
                    "max_tokens": int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                    "stop": [until] if isinstance(until, str) else list(until),
                }
            )
        return greedy_outputs(self.cfg.model, self.tokenizer, rows, self.generator, batch=self.batch)


def run_lm_eval(
    run_dir: str, tasks: list[str], include: str | None, limit: int | None, out: str | None, mesh: str, log=print
) -> dict:
    """lm-eval's tasks on the run (`llm-jax eval --lm-eval`): lm-eval's table, and its results JSON
    (default <run>/eval/lm_eval_step<N>.json)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"lm-eval knows no task {', '.join(unknown)}; see `python -m lm_eval ls tasks`, or pass "
            "--lm-eval-include DIR for your own task YAMLs"
        )
    model = LlmJaxLM(run_dir, mesh)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit)
    log(make_table(results))
    step = model.step
    path = Path(out).expanduser() if out else eval_record_path(run_dir, step).with_name(f"lm_eval_step{step}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run_dir), "step": step, "tasks": tasks, "limit": limit, "results": results["results"]}
    path.write_text(json.dumps(record, indent=2, default=str))
    log(f"-> {path}")
    return record


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
