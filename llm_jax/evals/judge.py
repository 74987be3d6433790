"""`llm-jax judge`: LLM-as-judge through any OpenAI-compatible chat endpoint (llm-jax serve, vLLM,
OpenAI, ...), pairwise with position swap or single-answer ratings, with a fixed rubric.

Questions: JSONL rows {"question": str} or {"messages": [...]} (the last user turn is shown to the
judge). Contestants: a run directory (greedy answers through the chat template) or a JSONL file of
{"answer": str}, one row per question. Pairwise, each question is judged twice, A/B and B/A; a
contestant wins only when both orders agree, anything else is a tie, which cancels the judge's
position bias. Each judgment is appended to the output file as it arrives; a rerun with the same
output file resumes after the questions already judged, so an endpoint that fails mid-way loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from llm_jax.data.chat_template import check_messages
from llm_jax.data.progress import progress
from llm_jax.errors import UserError
from llm_jax.evals.harness import generation
from llm_jax.run import load_run

SYSTEM = (
    "You are a strict, impartial judge of answers to a user's question. Judge correctness first, then "
    "helpfulness and clarity. Ignore the length of the answers and the order in which they are shown."
)
PAIRWISE = (
    "[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    'Which answer is better? Reply with exactly one line: "Verdict: A", "Verdict: B" or "Verdict: tie".'
)
SINGLE = (
    "[Question]\n{question}\n\n[Answer]\n{a}\n\n"
    'Rate the answer from 1 (useless) to 10 (perfect). Reply with exactly one line: "Rating: [[N]]".'
)
_VERDICT = re.compile(r"verdict\s*:\s*\[*\s*(a|b|tie)\b", re.IGNORECASE)
_RATING = re.compile(r"\[\[\s*(10|[1-9])\s*\]\]")


def parse_verdict(reply: str) -> str | None:
    """'A', 'B', 'tie', or None when the reply has no verdict line."""
    match = _VERDICT.search(reply)
    return None if match is None else {"a": "A", "b": "B", "tie": "tie"}[match.group(1).lower()]


def parse_rating(reply: str) -> int | None:
    match = _RATING.search(reply)
    return None if match is None else int(match.group(1))


def pairwise_outcome(first: str | None, swapped: str | None) -> str:
    """first: the verdict with A shown first; swapped: with B shown first (its 'A' is our B)."""
    if first is None or swapped is None:
        return "invalid"
    swapped = {"A": "B", "B": "A", "tie": "tie"}[swapped]
    return first if first == swapped and first != "tie" else "tie"


def summarize(rows: list[dict], mode: str) -> dict:
    if mode == "single":
        ratings = [r["rating"] for r in rows if r["rating"] is not None]
        return {
            "n": len(rows),
            "rated": len(ratings),
            "invalid": len(rows) - len(ratings),
            "mean_rating": sum(ratings) / len(ratings) if ratings else None,
        }
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("A", "B", "tie", "invalid")}
    valid = len(rows) - counts["invalid"]
    return {"n": len(rows), **counts, "win_rate_a": (counts["A"] + counts["tie"] / 2) / valid if valid else None}


class Endpoint:
    def __init__(self, base_url: str, model: str, api_key: str | None, max_tokens: int = 64, timeout: float = 120):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_tokens, self.timeout = model, api_key, max_tokens, timeout

    def ask(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        }
        headers = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        )
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise ConnectionError(f"the judge at {self.url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(
                f"the judge at {self.url} is unreachable ({reason}); check --judge-url / "
                "$LLM_JAX_JUDGE_URL and that the server is up"
            ) from None
        except (KeyError, IndexError, json.JSONDecodeError):
            raise ConnectionError(f"the judge at {self.url} did not answer like an OpenAI chat endpoint") from None


def load_questions(path: str) -> list[list[dict]]:
    """The conversations to judge: a question as one user turn, or chat messages without a trailing
    assistant reply."""
    rows, path = [], Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"questions file {path} does not exist")
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("question"), str):
            rows.append([{"role": "user", "content": row["question"]}])
        elif isinstance(row, dict) and "messages" in row:
            check_messages(row["messages"], where)
            rows.append([m for m in row["messages"] if m["role"] != "assistant" or m is not row["messages"][-1]])
        else:
            raise UserError(f"{where}: needs a string 'question' or chat 'messages'")
    if not rows:
        raise UserError(f"{path} holds no questions")
    return rows


def answers(contestant: str, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    """A run directory's greedy replies, or the 'answer' rows of a JSONL file."""
    path = Path(contestant).expanduser()
    if path.is_dir():
        run = load_run(contestant)
        rows = [
            {"messages": c, "answer": "", "task": "all", "max_tokens": max_tokens, "stop": []} for c in conversations
        ]
        return generation(run.cfg.model, run.params, run.tokenizer, rows, run.cfg.sample.system)[1]
    if not path.is_file():
        raise UserError(f"contestant {contestant} is neither a run directory nor an answers JSONL file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line)["answer"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'{path}:{lineno}: expected {{"answer": text}}') from None
    if len(out) != len(conversations):
        raise UserError(f"{path} has {len(out)} answers for {len(conversations)} questions")
    return out


def judge(questions: str, a: str, b: str | None, endpoint: Endpoint, out: str, max_tokens: int = 64, log=print) -> dict:
    mode = "pairwise" if b else "single"
    conversations = load_questions(questions)
    out_path = Path(out).expanduser()
    done = (
        [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()] if out_path.is_file() else []
    )
    if done and done[0].get("mode") != mode:
        raise UserError(f"{out_path} holds {done[0].get('mode')} judgments; use another --out for {mode}")
    answers_a = answers(a, conversations, max_tokens)
    answers_b = answers(b, conversations, max_tokens) if b else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a") as f:
        left = range(len(done), len(conversations))
        for i in progress(left, len(left), f"judging ({mode})", log):
            question = conversations[i][-1]["content"]
            try:
                if mode == "single":
                    reply = endpoint.ask(SINGLE.format(question=question, a=answers_a[i]))
                    row = {"mode": mode, "index": i, "reply": reply, "rating": parse_rating(reply)}
                else:
                    first = endpoint.ask(PAIRWISE.format(question=question, a=answers_a[i], b=answers_b[i]))
                    swapped = endpoint.ask(PAIRWISE.format(question=question, a=answers_b[i], b=answers_a[i]))
                    row = {
                        "mode": mode,
                        "index": i,
                        "replies": [first, swapped],
                        "outcome": pairwise_outcome(parse_verdict(first), parse_verdict(swapped)),
                    }
            except ConnectionError as e:
                raise UserError(
                    f"{e}. {len(done)} of {len(conversations)} questions judged; they are kept in "
                    f"{out_path} and a rerun with the same --out resumes after them"
                ) from None
            f.write(json.dumps(row | {"question": question}) + "\n")
            f.flush()
            done.append(row)
    summary = summarize(done, mode)
    log(format_summary(summary, mode, a, b))
    return summary


def format_summary(s: dict, mode: str, a: str, b: str | None) -> str:
    if mode == "single":
        mean = "n/a" if s["mean_rating"] is None else f"{s['mean_rating']:.2f}"
        return f"{a}: mean rating {mean} over {s['rated']} of {s['n']} answers ({s['invalid']} unparsed)"
    rate = "n/a" if s["win_rate_a"] is None else f"{s['win_rate_a']:.1%}"
    return "\n".join(
        [
            f"{'':<10} {'count':>6}",
            f"{'A wins':<10} {s['A']:>6}   A = {a}",
            f"{'B wins':<10} {s['B']:>6}   B = {b}",
            f"{'ties':<10} {s['tie']:>6}",
            f"{'invalid':<10} {s['invalid']:>6}",
            f"win rate of A (ties count half, invalid excluded): {rate} over {s['n']} questions",
        ]
    )


def endpoint_from_env(url: str | None, model: str | None) -> Endpoint:
    url = url or os.environ.get("LLM_JAX_JUDGE_URL")
    model = model or os.environ.get("LLM_JAX_JUDGE_MODEL")
    if not url or not model:
        raise UserError(
            "name the judge: --judge-url (or $LLM_JAX_JUDGE_URL, e.g. http://127.0.0.1:8000/v1) and "
            "--judge-model (or $LLM_JAX_JUDGE_MODEL); the key comes from $LLM_JAX_JUDGE_API_KEY"
        )
    return Endpoint(url, model, os.environ.get("LLM_JAX_JUDGE_API_KEY"))
