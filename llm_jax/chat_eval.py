"""Exact-match accuracy of a chat model on held-out questions with one right answer.

Each row of a JSONL file (the synth-sft / synth-dpo format) gives the conversation up to the
reply ("messages"; a trailing assistant message is the reference and is dropped), the "answer" and
optionally a "task". The model replies greedily through the chat template, stopping at
<|end_of_turn|>; the reply is right when it equals the answer after stripping surrounding spaces.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from llm_jax.chat import check_messages, prompt_ids
from llm_jax.config import ModelConfig
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.generate import Generator, fit_prompt


def load_questions(path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file as {"messages", "answer", "task"}; with `limit`, that many spread
    evenly over the file (every len // limit-th), so a subset keeps the file's mix of tasks."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist; write one with `llm-jax data synth-sft --out DIR`")
    rows = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
            raise UserError(f"{where}: needs a string 'answer' (the one right reply) and 'messages'")
        messages = row.get("messages")
        check_messages(messages, where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        rows.append({"messages": messages, "answer": row["answer"], "task": row.get("task", "all")})
    if not rows:
        raise UserError(f"{path} holds no questions")
    return rows[::len(rows) // limit][:limit] if limit and limit < len(rows) else rows


def exact_match(model_cfg: ModelConfig, params, tokenizer: Tokenizer, rows: list[dict],
                max_new_tokens: int = 32, system: str | None = None) -> dict[str, float]:
    """{"all": accuracy, <task>: accuracy, ...} over the rows (greedy replies)."""
    generator = Generator(model_cfg, params)
    right, total = defaultdict(int), defaultdict(int)
    for row in rows:
        ids, stop = prompt_ids(tokenizer, row["messages"], system)
        ids, max_new, _ = fit_prompt(ids, model_cfg.seq_len, max_new_tokens)
        reply = tokenizer.decode(list(generator.stream(ids, max_new, stop_ids=stop)))
        ok = int(reply.strip() == row["answer"].strip())
        for key in ("all", row["task"]):
            right[key] += ok
            total[key] += 1
    return {k: right[k] / total[k] for k in sorted(total, key=lambda k: (k != "all", k))}
