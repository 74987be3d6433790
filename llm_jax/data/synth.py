"""Seeded synthetic chat data with verifiable answers: SFT conversations and DPO preference pairs.

Five tasks, each question with one correct answer and a key space of hundreds to thousands of
questions: adding a digit to or subtracting one from a number below 100, the larger of two numbers
below 100, counting the words of a list, the last of three words. Held-out examples never share a
(task, operands) pair with training ones, so a held-out question is new: the word tasks and the
comparison test generalisation of a pattern; add / sub need the digit facts and carries composed
with new numbers (the hardest: the 6.6M demo model does not learn them within `make demo-chat`).
A preference pair's `chosen` is the correct, well-formed answer; `rejected` is plausible but wrong
(an off-by-one or off-by-ten number, another word, a wrong count) or badly formed (correct but
wrapped in chatter, 25% of pairs).
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

WORDS = [
    "apple",
    "bread",
    "chair",
    "dance",
    "eagle",
    "flame",
    "grape",
    "house",
    "island",
    "jewel",
    "knife",
    "lemon",
    "money",
    "night",
    "ocean",
    "paper",
    "queen",
    "river",
    "stone",
    "table",
    "uncle",
    "voice",
    "water",
    "youth",
    "zebra",
    "bird",
    "cloud",
    "dream",
    "earth",
    "field",
    "glass",
    "heart",
    "light",
    "music",
    "north",
    "plant",
    "quiet",
    "round",
    "sheep",
    "tiger",
    "under",
    "value",
    "wheel",
    "yellow",
    "storm",
    "crown",
    "sword",
    "honey",
    "salt",
    "tower",
]


def _add(rng):
    a, b = rng.randrange(100), rng.randrange(1, 10)
    return (a, b), f"What is {a} + {b}?", str(a + b)


def _sub(rng):
    a, b = rng.randrange(10, 100), rng.randrange(1, 10)
    return (a, b), f"What is {a} - {b}?", str(a - b)


def _larger(rng):
    a, b = rng.sample(range(100), 2)
    return (a, b), f"Which is larger, {a} or {b}?", str(max(a, b))


def _count_words(rng):
    words = tuple(rng.sample(WORDS, rng.randrange(2, 7)))
    return words, f"How many words are in: {' '.join(words)}?", str(len(words))


def _last_word(rng):
    words = tuple(rng.sample(WORDS, 3))
    return words, f"What is the last word of: {' '.join(words)}?", words[-1]


# Each task's key space is large (thousands of questions or more), so none runs out of new questions.
TASKS = {"add": _add, "sub": _sub, "larger": _larger, "count_words": _count_words, "last_word": _last_word}
SYSTEM = "Answer only."  # short: every token of it is compute spent on each example


def _wrong(task: str, answer: str, rng: random.Random) -> str:
    """A plausible but wrong answer, or the right one badly formed."""
    if rng.random() < 0.25:
        return f"Sure! Let me think about that. The answer might be {answer}, I hope this helps you today."
    if task == "count_words":
        return str(int(answer) + rng.choice((-1, 1)))
    if task in ("add", "sub", "larger"):
        return str(int(answer) + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if int(answer) + d >= 0]))
    return rng.choice([w for w in WORDS if w != answer])


def examples(n: int, seed: int, held_out: float = 0.1) -> tuple[list[dict], list[dict]]:
    """n examples split into (train, test) by a hash of (task, operands): no overlap between them."""
    rng, seen, train, test = random.Random(seed), set(), [], []
    attempts = 0
    while len(train) + len(test) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"cannot draw {n} distinct examples from the synthetic tasks; ask for fewer")
        task = rng.choice(sorted(TASKS))
        key, question, answer = TASKS[task](rng)
        if (task, key) in seen:
            continue
        seen.add((task, key))
        row = {
            "task": task,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            "answer": answer,
            "rejected": _wrong(task, answer, rng),
        }
        held = zlib.crc32(repr((seed, task, key)).encode()) / 2**32 < held_out  # stable across processes
        (test if held else train).append(row)
    return train, test


def write_sft(out: Path, n: int, seed: int) -> dict[str, Path]:
    """train.jsonl / test.jsonl of {"task", "messages", "answer"}."""
    return _write(out, n, seed, lambda r: {k: r[k] for k in ("task", "messages", "answer")})


def write_dpo(out: Path, n: int, seed: int) -> dict[str, Path]:
    """train.jsonl / test.jsonl of {"task", "messages" (without the answer), "chosen", "rejected", "answer"}."""
    return _write(
        out,
        n,
        seed,
        lambda r: {
            "task": r["task"],
            "messages": r["messages"][:-1],
            "chosen": r["answer"],
            "rejected": r["rejected"],
            "answer": r["answer"],
        },
    )


def _write(out: Path, n: int, seed: int, shape) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in zip(("train", "test"), examples(n, seed)):
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(shape(r)) + "\n" for r in rows))
    return paths
