"""Training throughput of one optimizer step (forward, backward, clipping, AdamW), llm_jax against the
PyTorch peers of the same shape, each in its own process, one after the other, in one invocation.

Shape (the README's peer comparison): 6 layers, d_model 384, 6 heads (MHA), SwiGLU hidden 1024, tied
embeddings, seq 256, batch 8, vocab 50304 (29.9M parameters, 186.7 MFLOP per token).

Variants (--variants, default all that can run here):
- llm_jax-float32, llm_jax-bfloat16: llm_jax's jitted train step (bfloat16: bf16 activations and matmul
  inputs, float32 accumulation, float32 parameters and AdamW state).
- hf-eager-float32, hf-eager-bfloat16, hf-compile-float32, hf-compile-bfloat16: Hugging Face
  transformers' LlamaForCausalLM of the same shape (torch, 2 threads), torch.optim.AdamW (same betas,
  eps and weight decay) after clip_grad_norm_(1.0), eager or torch.compile'd (the whole step: forward,
  backward, clipping, optimizer); bfloat16 = torch.autocast (bf16 matmuls, float32 master weights).
  Needs torch and transformers (the dev extra on Python 3.11, or the `hf` extra).

Before the variants, one process measures the machine's matmul rate (2048 x 2048, float32 accumulation;
XLA, and torch where installed) and the table ends with the ceiling it puts on any implementation: step
FLOPs at that rate, i.e. the tokens/s of a step that did nothing but matmuls at the fastest rate seen.

    python benchmarks/train_throughput.py [--variants llm_jax-bfloat16,hf-compile-bfloat16] [--steps 10]
                                          [--rounds 3] [--json]
    python benchmarks/train_throughput.py --variants llm_jax-float32 model.remat=full   # extra llm_jax overrides
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS, D_MODEL, HEADS, MLP, SEQ, BATCH, VOCAB = 6, 384, 6, 1024, 256, 8, 50304
SHAPE = [
    f"model.n_layers={LAYERS}",
    f"model.d_model={D_MODEL}",
    f"model.n_heads={HEADS}",
    f"model.n_kv_heads={HEADS}",
    f"model.mlp_dim={MLP}",
    "model.tie_embeddings=true",
    f"model.seq_len={SEQ}",
    f"model.vocab_size={VOCAB}",
    f"train.batch_size={BATCH}",
    "mesh.data=-1",
]
OURS = ["llm_jax-float32", "llm_jax-bfloat16"]
PEERS = ["hf-eager-float32", "hf-eager-bfloat16", "hf-compile-float32", "hf-compile-bfloat16"]
WARMUP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {OURS + PEERS} (default: all)")
    parser.add_argument("--steps", type=int, default=10, help=f"timed steps per variant (after {WARMUP} warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every variant this many times, interleaved, and report the median"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("overrides", nargs="*", help="extra llm_jax config overrides, e.g. model.remat=full")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.steps, args.overrides)))
        return

    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    variants = args.variants.split(",") if args.variants else OURS + (PEERS if has_torch else [])
    unknown = [v for v in variants if v not in OURS + PEERS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}: choose from {', '.join(OURS + PEERS)}")
    if not has_torch and any(v in PEERS for v in variants):
        sys.exit("the PyTorch peers need torch and transformers: pip install -e '.[hf]'")
    header = machine()
    ceiling = json.loads(worker_output("matmul", args) or "{}")
    runs = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: a noisy neighbour on a shared host hits every variant alike
        for variant in variants:  # one process each: no two frameworks share the cores or a thread pool
            runs[variant].append(json.loads(worker_output(variant, args)))
            if not args.json:
                rate = runs[variant][-1]["tokens_per_s"]
                print(f"  {variant}: {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
    results = {v: median_run(r) for v, r in runs.items()}
    summary = ratios(results)
    summary["ceiling"] = ceiling
    if args.json:
        print(json.dumps({"machine": header, "results": results, **summary}))
        return
    print(table(header, results, summary))


def worker_output(variant: str, args) -> str:
    """Runs one variant (or the matmul probe) in its own process; its last line of stdout."""
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), *args.overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{variant} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


# (M, K, N) of bf16 matmuls with float32 accumulation: the 2048^2 reference, then shapes of this step (2048 rows:
# batch x seq): the LM head's vocabulary tile and the whole-vocabulary block, the SwiGLU up projection
MATMUL_SHAPES = ((2048, 2048, 2048), (2048, D_MODEL, 2096), (2048, D_MODEL, 6288), (2048, D_MODEL, MLP))


def matmul_ceiling() -> dict:
    """The fastest 2048^2 matmul rate seen (XLA float32 / bf16 inputs, torch likewise where installed), the
    tokens/s of a step of this shape made of nothing but matmuls at that rate, and both libraries' bf16 rates
    on the step's own shapes (MATMUL_SHAPES)."""
    import jax
    import jax.numpy as jnp

    from llm_jax.config import load_config
    from llm_jax.model.transformer import flops_per_token
    from llm_jax.train.metrics import measured_matmul_flops

    def best_rate(run, args: tuple, flops: float) -> float:
        run(*args)
        best = float("inf")
        for _ in range(6):
            t = time.perf_counter()
            run(*args)
            best = min(best, time.perf_counter() - t)
        return flops / best

    rates = {f"xla-{d}": measured_matmul_flops(d) for d in ("float32", "bfloat16")}
    shapes = {}
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    for m, k, n in MATMUL_SHAPES:
        x, y = jnp.ones((m, k), jnp.bfloat16), jnp.ones((k, n), jnp.bfloat16)
        shapes[f"{m}x{k}x{n}"] = {"xla": best_rate(lambda a, b: mm(a, b).block_until_ready(), (x, y), 2 * m * k * n)}
    if importlib.util.find_spec("torch"):
        import torch

        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
            rates[f"torch-{name}"] = best_rate(torch.mm, (a, b), 2 * 2048**3)
        for m, k, n in MATMUL_SHAPES:
            a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
            shapes[f"{m}x{k}x{n}"]["torch"] = best_rate(torch.mm, (a, b), 2 * m * k * n)
    fastest = max(rates, key=rates.get)
    per_token = flops_per_token(load_config(None, SHAPE).model)
    return {"rates": rates, "fastest": fastest, "tokens_per_s": rates[fastest] / per_token, "bf16_shapes": shapes}


def machine() -> dict:
    import jax

    from llm_jax.model.device import cpu_info

    cpu = cpu_info()
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name):
            versions[name] = __import__(name).__version__
    return {
        "cpu": cpu["model"],
        "cores": cpu["cores"],
        "flags": cpu["flags"],
        "date": str(datetime.date.today()),
        "versions": versions,
    }


def run_variant(variant: str, steps: int, overrides: list[str]) -> dict:
    """Compiles (or warms up) and times one variant in this process: tokens/s from the median step."""
    if variant == "matmul":
        return matmul_ceiling()
    framework, *mode, dtype = variant.split("-")
    step, tokens = (ours if framework == "llm_jax" else hf)(dtype, *mode, overrides=overrides)
    t0 = time.perf_counter()
    for _ in range(WARMUP):
        step()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "tokens_per_s": tokens / step_s,
        "ms_per_step": 1e3 * step_s,
        "warmup_s": warmup_s,
        "spread_ms": [1e3 * min(times), 1e3 * max(times)],
    }


def ours(dtype: str, overrides: list[str]):
    import jax
    import numpy as np

    from llm_jax.config import load_config
    from llm_jax.parallel.sharding import make_layout
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    cfg = load_config(None, [*SHAPE, f"model.dtype={dtype}", "train.steps=1000", *overrides])
    layout = make_layout(cfg.mesh)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    box = {"state": steps.init(jax.random.PRNGKey(0))}
    rng = np.random.default_rng(0)
    batches = [layout.put_batch({"tokens": rng.integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)}) for _ in range(2)]

    def step():
        box["state"], metrics = steps.train(box["state"], batches[int(box["state"].step) % 2])
        jax.block_until_ready(metrics)

    return step, BATCH * SEQ


def hf(dtype: str, mode: str, overrides: list[str]):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = [
        (t[:, :-1].contiguous(), t[:, 1:].contiguous())
        for t in (torch.randint(0, VOCAB, (BATCH, SEQ + 1)) for _ in range(2))
    ]

    def train_step(inputs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(train_step) if mode == "compile" else train_step
    count = {"i": 0}

    def step():
        fn(*batches[count["i"] % 2]).item()
        count["i"] += 1

    return step, BATCH * SEQ


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate, and the rates of all rounds."""
    mid = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return {**mid, "rounds": [round(r["tokens_per_s"], 1) for r in runs]}


def ratios(results: dict) -> dict:
    """ours / the best peer, per dtype and overall (fastest against fastest)."""
    out = {}
    best = lambda names: max((results[n]["tokens_per_s"], n) for n in names) if names else None  # noqa: E731
    for dtype in ("float32", "bfloat16", None):
        mine = best([n for n in results if n.startswith("llm_jax") and (dtype is None or n.endswith(dtype))])
        peer = best([n for n in results if n.startswith("hf") and (dtype is None or n.endswith(dtype))])
        if mine and peer:
            key = f"ours_over_best_peer_{dtype or 'any'}"
            out[key] = {"ratio": mine[0] / peer[0], "ours": mine[1], "peer": peer[1]}
    return out


def table(header: dict, results: dict, summary: dict) -> str:
    flags = ", ".join(header["flags"]) or "none of avx2/avx512/bf16/amx"
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    lines = [
        f"{header['cpu']}, {header['cores']} cores ({flags}); {versions}; {header['date']}",
        f"shape: {LAYERS} layers, d_model {D_MODEL}, {HEADS} heads, SwiGLU {MLP}, vocab {VOCAB}, seq {SEQ}, "
        f"batch {BATCH}; one full AdamW step",
        "| variant | tokens/s | ms/step (median) | min-max ms | warm-up s | tokens/s by round |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        lo, hi = r["spread_ms"]
        rate, ms, warm = r["tokens_per_s"], r["ms_per_step"], r["warmup_s"]
        rounds = ", ".join(f"{x:,.0f}" for x in r["rounds"])
        lines.append(f"| {name} | {rate:,.0f} | {ms:,.0f} | {lo:,.0f}-{hi:,.0f} | {warm:.0f} | {rounds} |")
    ceiling = summary.pop("ceiling", None)
    for key, r in summary.items():
        lines.append(f"{key.replace('_', ' ')}: {r['ratio']:.2f}x ({r['ours']} / {r['peer']})")
    if ceiling:
        rates = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in ceiling["rates"].items())
        best_peer = max((r["tokens_per_s"] for n, r in results.items() if n.startswith("hf")), default=None)
        top = ceiling["tokens_per_s"]
        line = f"matmul GFLOP/s (2048^2): {rates}; ceiling at {ceiling['fastest']}: {top:,.0f} tokens/s"
        if best_peer:
            need = 1.5 * best_peer
            line += f"; 1.5x the best peer = {need:,.0f} tokens/s = {need / top:.0%} of the ceiling"
        lines.append(line)
        per_shape = ", ".join(
            f"{shape} " + " / ".join(f"{lib} {rate / 1e9:,.0f}" for lib, rate in r.items())
            for shape, r in ceiling["bf16_shapes"].items()
        )
        lines.append(f"bf16 matmul GFLOP/s by shape (M x K x N): {per_shape}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
