"""Exact-match accuracy of a chat model on held-out questions with one right answer (`llm-jax
eval-chat`, `make demo-chat`): generation rows of llm_jax/evals/tasks.py ({"messages", "answer",
"task"}, as synth-sft / synth-dpo write them; a trailing assistant message is the reference and is
dropped), answered greedily through the chat template; right when the reply equals the answer
after stripping surrounding spaces.
"""

from __future__ import annotations

from pathlib import Path

from llm_jax.config import ModelConfig
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.evals.harness import generation
from llm_jax.evals.tasks import load_task
from llm_jax.run import load_run


def load_questions(path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file; with `limit`, that many spread evenly over the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist; write one with `llm-jax data synth-sft --out DIR`")
    task = load_task(str(path), limit)
    if task.kind != "generate" or any("messages" not in row for row in task.rows):
        raise UserError(f"{path}: every row needs 'messages' and a string 'answer' (the one right reply)")
    return task.rows


def exact_match(
    model_cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    rows: list[dict],
    max_new_tokens: int = 32,
    system: str | None = None,
) -> dict[str, float]:
    """{"all": accuracy, <task>: accuracy, ...} over the rows (greedy replies, 16 at a time)."""
    rows = [row | {"max_tokens": max_new_tokens} for row in rows]
    scores, _ = generation(model_cfg, params, tokenizer, rows, system)
    return {task: s["exact_match"] for task, s in scores.items()}


def run_eval_chat(run_dir: str, data: str, limit: int | None, system: str | None, log=print) -> dict[str, float]:
    """`llm-jax eval-chat`: exact match of a run on a questions file, printed per task."""
    run = load_run(run_dir)
    rows = load_questions(data, limit)
    scores = exact_match(run.cfg.model, run.params, run.tokenizer, rows, system=system)
    log(f"exact match of {run_dir} ({run.step} steps) on {len(rows)} questions of {data}:")
    for task, acc in scores.items():
        log(f"  {task:<14} {acc:6.1%}")
    return scores
