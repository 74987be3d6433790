"""Training throughput of one optimizer step (forward, backward, AdamW) on this machine.

Default shape (the nanoGPT/HF peer comparison in the README): 6 layers, d_model 384, 6 heads (MHA),
SwiGLU hidden 1024, tied embeddings, seq 256, batch 8, vocab 50304. MFU is measured against the
best n x n matmul rate this machine reaches (f32, and bf16 inputs with f32 accumulation).

    python benchmarks/train_throughput.py [--dtype float32] [--steps 10] [--json] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = [
    "model.n_layers=6",
    "model.d_model=384",
    "model.n_heads=6",
    "model.n_kv_heads=6",
    "model.mlp_dim=1024",
    "model.tie_embeddings=true",
    "model.seq_len=256",
    "model.vocab_size=50304",
    "train.batch_size=8",
    "mesh.data=-1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.remat=full")
    args = parser.parse_args()

    import jax
    import numpy as np

    from llm_jax.config import load_config
    from llm_jax.model.transformer import count_params, flops_per_token
    from llm_jax.parallel.sharding import make_layout
    from llm_jax.train.metrics import measured_matmul_flops
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    cfg = load_config(None, SHAPE + [f"model.dtype={args.dtype}", f"train.steps={args.steps + 2}"] + args.overrides)
    peaks = {dt: measured_matmul_flops(dt) for dt in ("float32", "bfloat16")}
    peak = max(peaks.values())
    layout = make_layout(cfg.mesh)
    t0 = time.perf_counter()
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    state = steps.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = [
        layout.put_batch(
            {
                "tokens": rng.integers(
                    0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32
                )
            }
        )
        for _ in range(2)
    ]
    for i in range(2):
        state, metrics = steps.train(state, batches[i])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, metrics = steps.train(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = cfg.train.batch_size * cfg.model.seq_len
    result = {
        "tokens_per_s": tokens / step_s,
        "ms_per_step": 1e3 * step_s,
        "mfu": tokens / step_s * flops_per_token(cfg.model) / peak,
    }
    if args.json:
        print(json.dumps(result))
        return
    rows = [
        ("device", f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"),
        ("parameters", f"{count_params(state.params):,}"),
        ("compute dtype", cfg.model.dtype),
        ("tokens/step", f"{tokens:,}"),
        ("FLOPs/token (6N + attention)", f"{flops_per_token(cfg.model) / 1e6:.1f} M"),
        ("peak matmul f32", f"{peaks['float32'] / 1e9:.1f} GFLOP/s"),
        ("peak matmul bf16 -> f32", f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s"),
        ("compile + 2 warm-up steps", f"{compile_s:.1f} s"),
        ("ms/step (median)", f"{result['ms_per_step']:.0f}"),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("MFU (vs best peak)", f"{result['mfu']:.1%}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))


if __name__ == "__main__":
    main()
