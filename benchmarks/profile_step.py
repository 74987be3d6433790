"""Where a train step's time goes on this machine: XLA's profiler (jax.profiler) over a few steps of
the benchmark shape (benchmarks/train_throughput.py), per compiled op and per part of the step.

Each op of the compiled step (a fusion, a library matmul, a loop) is named in the trace; its time is
summed over the steps and both threads of the CPU runtime (ops of the two threads overlap, so the
total exceeds the wall time), and mapped to the JAX code that made it through the HLO's op_name:
layers forward / backward, LM head and loss, optimizer. For each op the top lines show its output
shape and the dtypes of its inputs, which is how a float32 matmul hiding in a bfloat16 step shows up.

    python benchmarks/profile_step.py [--dtype bfloat16] [--steps 3] [--top 25] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = (  # (part, pattern in the op_name) in the order they are tried
    ("LM head + loss, backward", "transpose(jvp(Transformer.nll_sum"),
    ("LM head + loss", "Transformer.nll_sum"),
    ("layers, backward", "transpose(jvp(Transformer))"),
    ("layers, forward", "jvp(Transformer)"),
    ("optimizer and the rest of the step", "jit(train_step)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=25, help="ops listed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax
    import numpy as np
    from train_throughput import SHAPE

    from llm_jax.config import load_config
    from llm_jax.parallel.sharding import make_layout
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    cfg = load_config(None, [*SHAPE, f"model.dtype={args.dtype}", *args.overrides])
    layout = make_layout(cfg.mesh)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    hlo = steps.compile_train().as_text()
    state = steps.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    batch = layout.put_batch({"tokens": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)})
    for _ in range(2):
        state, metrics = steps.train(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(args.steps):
                state, metrics = steps.train(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / args.steps
        trace = jax.profiler.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    times = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # the CPU runtime's worker threads
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                        times[event.name] += event.duration_ns / 1e6 / args.steps
    ops = _ops(hlo)
    parts = collections.Counter()
    for name, ms in times.items():
        parts[_part(ops.get(name, {}).get("op_name", ""))] += ms
    print(f"{cfg.model.dtype} step: {1e3 * wall:.0f} ms wall (profiled); op time {sum(times.values()):.0f} ms")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.1f} ms  {part}")
    print(f"top {args.top} ops (ms per step, summed over threads):")
    for name, ms in times.most_common(args.top):
        op = ops.get(name, {})
        where = _part(op.get("op_name", ""))
        print(f"  {ms:8.1f} ms  {name:<40} {op.get('shape', ''):<24} <- {op.get('inputs', '')}  [{where}]")


def _ops(hlo: str) -> dict:
    """HLO instruction name -> its output shape, its fused computation's input dtypes and shapes, op_name."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \((.*?)\) ->", hlo, re.M)}
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*$", hlo, re.M):
        line = m.group(0)
        called = re.search(r"calls=%([\w.\-]+)", line)
        inputs = re.findall(r": (\w+\[[\d,]*\])", bodies.get(called.group(1), "")) if called else []
        op_name = re.search(r'op_name="([^"]+)"', line)
        ops[m.group(1)] = {
            "shape": m.group(2).split("{")[0],
            "inputs": ", ".join(inputs[:3]),
            "op_name": op_name.group(1) if op_name else "",
        }
    return ops


def _part(op_name: str) -> str:
    return next((part for part, pattern in PARTS if pattern in op_name), "unattributed (copies, loop control)")


if __name__ == "__main__":
    main()
