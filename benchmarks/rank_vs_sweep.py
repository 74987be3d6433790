"""`llm-jax plan --rank`'s roofline order beside `llm-jax sweep`'s measured times, same layouts.

The sweep runs each layout's train step on 8 simulated CPU devices (this machine's cores, shared);
the rank compiles the same layouts for 8 TPU chips (v5e-8 by default) and orders them by the
roofline estimate. The two machines differ (a CPU's "devices" share two cores and one memory), so
agreement is not expected to be exact: the script prints both orders and their rank correlation,
which is what the README's "how far a ranking can be trusted" rests on.

    python benchmarks/rank_vs_sweep.py [--topology v5e-8] [--steps 3] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# a model small enough to time on 2 cores, big enough that layouts differ: 4 layers, d 512, seq 256
SHAPE = ["model.n_layers=4", "model.d_model=512", "model.n_heads=8", "model.n_kv_heads=8", "model.mlp_dim=1408"]
SHAPE += ["model.vocab_size=8192", "model.seq_len=256", "model.attention=xla", "train.batch_size=16"]
MESHES = "8,1,1;4,2,1;2,4,1;1,8,1;4,1,2;2,2,2;2,1,4;4,1,1,2,8"


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    return [order.index(i) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5e-8")
    parser.add_argument("--steps", type=int, default=3, help="timed sweep steps per layout")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import llm_jax  # noqa: F401  (before JAX: quiets libtpu)
    from benchmarks.plan_vs_compiler import cpu_name
    from llm_jax.config import load_config
    from llm_jax.parallel.chips import parse_topology
    from llm_jax.parallel.sharding import parse_meshes
    from llm_jax.tools.rank import RANK_RULES, candidates, label, rank
    from llm_jax.tools.sweep import run_sweep

    cfg = load_config("tiny", [*SHAPE, f"mesh.rules={RANK_RULES}", *args.overrides])
    topology = parse_topology(args.topology)
    wanted = {tuple(m[:4]) for m in parse_meshes(MESHES)}
    layouts = [
        c for c in candidates(cfg, topology) if (c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.pipeline) in wanted
    ]
    print(
        f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}: sweep on 8 simulated CPU devices, rank for {topology.describe()}"
    )
    ranked = {r["mesh"]: r for r in rank(cfg, topology, layouts, log=lambda *_: None)}
    meshes = [(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.pipeline, c.mesh.microbatches) for c in layouts]
    swept = {r["mesh"]: r for r in run_sweep(cfg, meshes, [cfg.train.batch_size], args.steps, log=lambda *_: None)}
    names = [label(c) for c in layouts if not swept[label(c)]["error"] and ranked[label(c)].get("fits")]
    cpu, tpu = [swept[n]["step_ms"] for n in names], [ranked[n]["step_ms"] for n in names]
    print(f"| layout | CPU sweep ms/step (measured) | CPU order | {topology.name} roofline ms (estimate) | order |")
    print("|---|---|---|---|---|")
    for n, c, t, rc, rt in zip(names, cpu, tpu, _ranks(cpu), _ranks(tpu)):
        print(f"| {n} | {c:.1f} | {rc + 1} | {t:.3f} | {rt + 1} |")
    d = sum((a - b) ** 2 for a, b in zip(_ranks(cpu), _ranks(tpu)))
    k = len(names)
    print(f"Spearman rank correlation of the two orders: {1 - 6 * d / (k * (k * k - 1)):+.2f} over {k} layouts")


if __name__ == "__main__":
    main()
