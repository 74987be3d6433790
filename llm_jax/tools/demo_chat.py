"""`make demo-chat`: pretrained demo model -> SFT -> DPO on the synthetic tasks, then an eval table.

Each stage is an ordinary run (configs/shakespeare.yaml, sft_shakespeare.yaml, dpo_shakespeare.yaml)
that resumes or is skipped when complete, so rerunning after an interruption picks up where it was.
The table: held-out exact match of the base, SFT and DPO models (the same questions, none seen in
training), and the DPO model's held-out reward accuracy and margin against its reference (the SFT
model). Printed and saved to runs/chat-demo.json and runs/chat-demo.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from llm_jax import run
from llm_jax.config import load_config
from llm_jax.data import synth
from llm_jax.errors import UserError
from llm_jax.evals.chat_eval import exact_match, load_questions
from llm_jax.train.loop import train

SFT_EXAMPLES, DPO_EXAMPLES, SEED = 20000, 4000, 0  # the same seed: DPO's held-out questions are SFT's
MAX_REPLY_TOKENS = 16  # the answers are at most 4 tokens; a reply that runs on is wrong anyway
RUNS = Path("runs")


def _stage(name: str, log=print):
    cfg = load_config(name)
    done = run.latest_checkpoint(run.checkpoint_dir(cfg.run_dir, cfg.train.checkpoint_dir))
    if done is not None and int(done.name) >= cfg.train.steps:
        log(f"== {name}: complete in {cfg.run_dir} ({done.name} steps), reused")
    else:
        log(f"== {name}: training into {cfg.run_dir}")
        train(cfg)
    return cfg


def main() -> dict:
    began = time.perf_counter()
    base = _stage("shakespeare")
    data = RUNS / "chat-data"  # where configs/sft_shakespeare.yaml and dpo_shakespeare.yaml read it
    for kind, n, write in (("sft", SFT_EXAMPLES, synth.write_sft), ("dpo", DPO_EXAMPLES, synth.write_dpo)):
        if not (data / kind / "test.jsonl").is_file():
            write(data / kind, n, SEED)
    sft, dpo = _stage("sft_shakespeare"), _stage("dpo_shakespeare")

    questions = load_questions(data / "sft" / "test.jsonl")  # every held-out question (~2,000)
    results = {}
    for label, cfg in (("base", base), ("sft", sft), ("dpo", dpo)):
        loaded = run.load_run(cfg.run_dir)
        results[label] = exact_match(
            loaded.cfg.model, loaded.params, loaded.tokenizer, questions, MAX_REPLY_TOKENS, sft.sample.system
        )
    val = [json.loads(line) for line in run.metrics_path(dpo.run_dir).read_text().splitlines()]
    final = [r for r in val if r["split"] == "val"][-1]
    summary = {
        "exact_match": results,
        "dpo_heldout": {k: final[k] for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")},
        "questions": len(questions),
        "minutes": (time.perf_counter() - began) / 60,
    }
    table = _table(summary)
    print(table)
    (RUNS / "chat-demo.json").write_text(json.dumps(summary, indent=2))
    (RUNS / "chat-demo.md").write_text(table + "\n")
    return summary


def _table(s: dict) -> str:
    tasks = list(s["exact_match"]["sft"])
    lines = [
        f"held-out exact match ({s['questions']} questions, greedy):",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for label, scores in s["exact_match"].items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores.get(t, 0):.1f}%" for t in tasks) + " |")
    d = s["dpo_heldout"]
    lines += [
        "",
        f"DPO on held-out pairs: reward accuracy {100 * d['reward_accuracy']:.1f}%, margin "
        f"{d['reward_margin']:.3f} (chosen {d['chosen_reward']:.3f}, rejected {d['rejected_reward']:.3f})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
