"""Quality per CPU-second on a small corpus: the demo's recipe against variants of it, each trained
for the same wall-clock budget on the builtin Shakespeare corpus and scored on the whole held-out
split (bits per byte). What this decides: the demo's defaults (configs/shakespeare.yaml).

Each candidate's step time is measured first (compiled, random batches of its shape); it then trains
budget / step time steps, so every candidate gets the same training seconds, whatever its batch,
context, vocabulary or optimizer costs. One process per training run; data (tokenizer, packed
shards) is prepared once per vocabulary size and copied into each run.

With --steps N every candidate trains N steps instead (equal tokens where the batch and context are the
demo's): how the MoE demo (configs/shakespeare-moe.yaml: 8 experts of half the MLP's width, 2 per token, the
dense demo's active parameters) compares with the dense one.

    python benchmarks/small_corpus.py [--budget-s 240 | --steps 800] [--only demo,muon] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE = "shakespeare"
CANDIDATES = {  # name: overrides of the demo's preset (wsd, vocab 16384, batch 16, z-loss 1e-4)
    "demo": [],
    "float32": ["model.dtype=float32"],
    "vocab 8192": ["model.vocab_size=8192"],
    "vocab 32768": ["model.vocab_size=32768"],
    "seq 256": ["model.seq_len=256"],
    "batch 8": ["train.batch_size=8"],
    "batch 32": ["train.batch_size=32"],
    "lr 1e-3": ["optim.lr=1e-3"],
    "lr 3e-3": ["optim.lr=3e-3"],
    "cosine schedule": ["optim.schedule=cosine"],
    "muon": ["optim.name=muon"],
    "no z-loss": ["optim.z_loss=0"],
    "moe 8x2": ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.mlp_dim=384"],  # = configs/shakespeare-moe.yaml
    "moe 1x1": ["model.moe.experts=1", "model.moe.top_k=1"],  # the MoE code path holding the dense MLP: a check
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=240.0, help="training seconds per candidate")
    parser.add_argument("--steps", type=int, default=0, help="train every candidate this many steps instead")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated candidates (default all: {', '.join(CANDIDATES)})"
    )
    parser.add_argument("--extra", action="append", default=[], help="NAME=key=value,key=value: one more candidate")
    parser.add_argument("--out", default="runs/small_corpus", help="where the runs go")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    candidates = dict(CANDIDATES)
    for extra in args.extra:
        name, _, overrides = extra.partition("=")
        candidates[name] = overrides.split(",")
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in candidates]
        if unknown:
            sys.exit(f"unknown candidate {unknown[0]!r}: choose from {', '.join(candidates)}")
        candidates = {n: candidates[n] for n in args.only.split(",")}
    if args.worker:
        print(json.dumps({"step_s": step_seconds(json.loads(args.worker))}))
        return

    out = Path(args.out)
    rows = {}
    for name, overrides in candidates.items():
        step_s = _worker_step_s(overrides)
        steps = args.steps or max(10, int(args.budget_s / step_s))
        run_dir = out / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        _copy_data(out, overrides, run_dir)
        t0 = time.perf_counter()
        cmd = [
            sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--config", BASE,
            f"run_dir={run_dir}", f"train.steps={steps}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 10)}", *overrides,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in metrics if m["split"] == "val"][-1]
        rates = [m["tokens_per_s"] for m in metrics if m["split"] == "train" and m["step"] > steps // 10]
        tokens_per_step = _tokens_per_step(overrides)
        rows[name] = {
            "overrides": overrides,
            "step_ms": 1e3 * step_s,
            "tokens_per_s": statistics.median(rates) if rates else tokens_per_step / step_s,
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "bpb": val["bpb"],
            "val_loss": val["loss"],
            "run_s": wall,
        }
        print(f"  {name}: {steps} steps, bpb {val['bpb']:.4f}", file=sys.stderr, flush=True)
    budget = f"{args.steps} steps" if args.steps else f"{args.budget_s:.0f} s"
    if args.json:
        print(json.dumps({"budget": budget, "machine": machine(), "rows": rows}))
        return
    print(table(budget, rows))


def step_seconds(overrides: list[str]) -> float:
    """Median seconds of the candidate's train step on random packed rows, after compiling."""
    import jax
    import numpy as np

    from llm_jax.config import load_config
    from llm_jax.parallel.sharding import make_layout
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    cfg = load_config(BASE, overrides)
    layout = make_layout(cfg.mesh)
    row = np.zeros(cfg.model.seq_len + 1, np.int32)
    steps = make_steps(
        cfg, layout, make_optimizer(cfg.optim, cfg.train.steps), example={"tokens": row, "segments": row}
    )
    state = steps.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    batch = layout.put_batch(
        {"tokens": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32), "segments": np.zeros(shape, np.int32)}
    )
    times = []
    for i in range(23):
        t = time.perf_counter()
        state, metrics = steps.train(state, batch)
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _worker_step_s(overrides: list[str]) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(overrides)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"timing {overrides} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["step_s"]


def _tokens_per_step(overrides: list[str]) -> int:
    from llm_jax.config import load_config

    cfg = load_config(BASE, overrides)
    return cfg.train.batch_size * cfg.model.seq_len


def _copy_data(out: Path, overrides: list[str], run_dir: Path) -> None:
    """The prepared data of this vocabulary size (built once: llm-jax data prepare), copied into run_dir."""
    from llm_jax.config import load_config

    vocab = load_config(BASE, overrides).model.vocab_size
    template = out / f"data-{vocab}"
    if not (template / "data").exists():
        shutil.rmtree(template, ignore_errors=True)
        cmd = [sys.executable, "-m", "llm_jax", "data", "prepare", "--config", BASE, f"run_dir={template}"]
        subprocess.run([*cmd, f"model.vocab_size={vocab}"], check=True, capture_output=True)
    shutil.copytree(template, run_dir, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "tb"))


def machine() -> str:
    import datetime

    from llm_jax.model.device import cpu_info

    cpu = cpu_info()
    flags = ", ".join(cpu["flags"]) or "no bf16/AMX flags"
    return f"{cpu['model']}, {cpu['cores']} cores ({flags}), {datetime.date.today()}"


def table(budget: str, rows: dict) -> str:
    lines = [
        f"{machine()}",
        f"equal training: {budget} per candidate; held-out bits per byte on the whole val split",
        "| candidate | overrides | ms/step | tokens/s | steps | tokens | held-out bpb |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["bpb"]):
        lines.append(
            f"| {name} | {' '.join(r['overrides']) or '(the demo)'} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['steps']:,} | {r['tokens'] / 1e6:.2f}M | {r['bpb']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
