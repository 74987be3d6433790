"""Evaluation tasks: what `llm-jax eval --tasks` accepts, read and checked before any model runs.

A task is one of
- `ppl:<source>`: loss, perplexity and bits per byte on a text source (a path, glob, directory,
  `builtin:shakespeare` or `tfds:...`, as in data.sources);
- a bundled name (llm_jax/evals/tasks/<name>.jsonl: shakespeare_speaker, shakespeare_cloze,
  shakespeare_next_word);
- a JSONL file of either kind of row:
  - multiple choice: {"context": str, "choices": [str, ...], "gold": int}, scored by the
    log-likelihood of each choice after the context: acc (the most likely choice is gold) and
    acc_norm (log-likelihood per character of the choice, as lm-evaluation-harness defines it). A choice
    is appended to the context as is, so it carries its own leading space.
  - generation: {"prompt": str | "messages": [...], "answer": str} with optional "regex" (the
    first group, or the whole match, of the greedy output is compared), "max_tokens" (default 32)
    and "stop" (strings); "messages" go through the chat template, a trailing assistant turn
    being the reference. Exact match after stripping surrounding spaces.
Every row may name its "task" (results are also broken down by it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llm_jax.data.chat_template import check_messages
from llm_jax.errors import UserError

BUNDLED = Path(__file__).parent / "tasks"


@dataclass
class Task:
    name: str
    kind: str  # "ppl" | "choice" | "generate"
    rows: list[dict]
    source: str = ""  # ppl: the text source


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.jsonl"))


def load_task(spec: str, limit: int | None = None) -> Task:
    if spec.startswith("ppl:"):
        if not spec[4:]:
            raise UserError("ppl: needs a text source, e.g. ppl:builtin:shakespeare or ppl:path/to/texts")
        return Task(spec, "ppl", [], spec[4:])
    path = BUNDLED / f"{spec}.jsonl" if (BUNDLED / f"{spec}.jsonl").is_file() else Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"task {spec!r} is neither a bundled task ({', '.join(bundled_names())}), a JSONL file, "
            "nor ppl:<text source>"
        )
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            rows.append(_check_row(line, f"{path}:{lineno}"))
    if not rows:
        raise UserError(f"{path} holds no rows")
    kinds = {row["kind"] for row in rows}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes multiple-choice and generation rows; put each kind in its own file")
    if limit and limit < len(rows):
        rows = rows[:: len(rows) // limit][:limit]  # spread over the file, keeping its mix of sub-tasks
    return Task(path.stem, kinds.pop(), rows)


def _check_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "choices" in row:
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(row.get("context"), str):
            raise UserError(f"{where}: a multiple-choice row needs a string 'context'")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise UserError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
            raise UserError(
                f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1}), got {gold!r}"
            )
        return {
            "kind": "choice",
            "context": row["context"],
            "choices": choices,
            "gold": gold,
            "task": str(row.get("task", "all")),
        }
    if not isinstance(row.get("answer"), str):
        raise UserError(
            f"{where}: a row needs 'choices' and 'gold' (multiple choice) or a string 'answer' (generation)"
        )
    out = {
        "kind": "generate",
        "answer": row["answer"],
        "task": str(row.get("task", "all")),
        "max_tokens": row.get("max_tokens", 32),
        "stop": row.get("stop", []),
    }
    if "messages" in row:
        messages = row["messages"]
        check_messages(messages, where)
        out["messages"] = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    elif isinstance(row.get("prompt"), str):
        out["prompt"] = row["prompt"]
    else:
        raise UserError(f"{where}: a generation row needs a string 'prompt' or chat 'messages'")
    if not (isinstance(out["max_tokens"], int) and out["max_tokens"] > 0):
        raise UserError(f"{where}: 'max_tokens' must be a positive integer")
    if not (isinstance(out["stop"], list) and all(isinstance(s, str) and s for s in out["stop"])):
        raise UserError(f"{where}: 'stop' must be a list of non-empty strings")
    if "regex" in row:
        try:
            out["regex"] = re.compile(row["regex"])
        except (re.error, TypeError) as e:
            raise UserError(f"{where}: bad 'regex' {row['regex']!r}: {e}") from None
    return out


def extract(output: str, regex: re.Pattern | None) -> str:
    """The part of a generated output compared with the answer."""
    if regex is None:
        return output.strip()
    match = regex.search(output)
    return "" if match is None else (match.group(1) if match.groups() else match.group(0)).strip()
