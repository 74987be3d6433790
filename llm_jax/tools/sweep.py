"""`llm-jax sweep`: the same config on several mesh layouts and batch sizes, a few timed steps each.

A layout is data,fsdp,tensor[,pipeline[,microbatches[,context[,repeats[,expert]]]]] (context: the
sequence split over mesh.context, model/context_parallel.py; repeats: mesh.pipeline_repeats, a circular
pipeline; expert: mesh.expert, an MoE model's experts split over it); pipelined rows also get the
bubble, (S - 1) / (R M + S - 1) in theory, and measured against the first unpipelined layout of the batch.

Per layout: compile time, the compiled step's per-device memory (XLA's memory analysis: the
arguments — train state and batch — plus outputs and temporaries, less what donation aliases),
median step time, tokens/s and MFU. Written as a table, sweep.csv and sweep.png. Layouts that do
not fit the model or the devices get a row with the reason; the others still run.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from llm_jax.config import Config, load_config
from llm_jax.config.checks import validate
from llm_jax.errors import UserError
from llm_jax.model.device import compute_dtype
from llm_jax.model.transformer import flops_per_token
from llm_jax.parallel.sharding import make_layout, parse_meshes
from llm_jax.train.metrics import peak_flops
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

COLUMNS = (
    "mesh",
    "batch_size",
    "compile_s",
    "step_ms",
    "tokens_per_s",
    "mfu",
    "arg_bytes",
    "temp_bytes",
    "peak_bytes",
    "bubble_theory",
    "bubble_measured",
    "error",
)


def measure(cfg: Config, steps_timed: int) -> dict:
    """Compiles cfg's train step on its mesh and times `steps_timed` steps after one warm-up step."""
    layout = make_layout(cfg.mesh)
    layout.check(cfg)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    t0 = time.perf_counter()
    compiled = steps.compile_train()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state = steps.init(jax.random.PRNGKey(cfg.seed))
    tokens = np.random.default_rng(cfg.seed).integers(
        0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32
    )
    batch = layout.put_batch({"tokens": tokens})
    times = []
    for i in range(steps_timed + 1):
        t = time.perf_counter()
        with layout.activate():
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = cfg.train.batch_size * cfg.model.seq_len / step_s
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(cfg.model) / peak_flops(compute_dtype(cfg.model.dtype).name),
        "arg_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
    }


def run_sweep(
    cfg: Config, meshes: list[tuple[int, ...]], batch_sizes: list[int], steps_timed: int, log=print
) -> list[dict]:
    rows = []
    for data, fsdp, tensor, stages, microbatches, context, repeats, expert in meshes:
        for batch_size in batch_sizes:
            mesh = dataclasses.replace(
                cfg.mesh,
                data=data,
                fsdp=fsdp,
                tensor=tensor,
                pipeline=stages,
                microbatches=microbatches,
                context=context,
                pipeline_repeats=repeats,
                expert=expert,
            )
            run = dataclasses.replace(cfg, mesh=mesh, train=dataclasses.replace(cfg.train, batch_size=batch_size))
            m = mesh.pipeline_microbatches
            row = {
                "mesh": f"{data}x{fsdp}x{tensor}"
                + (f" c{context}" if context > 1 else "")
                + (f" e{expert}" if expert > 1 else "")
                + (f" p{stages}m{m}" if stages > 1 else "")
                + (f"r{repeats}" if repeats > 1 else ""),
                "batch_size": batch_size,
                "error": "",
                "stages": stages,
                "bubble_theory": mesh.pipeline_bubble,
            }
            try:
                validate(run)  # what load_config checks of a config, for this layout
                row |= measure(run, steps_timed)
            except UserError as e:  # one line: a list's items without its heading
                lines = str(e).splitlines()
                listed = len(lines) > 1 and lines[0].endswith(":")
                row["error"] = "; ".join(line.lstrip(" -") for line in lines[1:]) if listed else str(e)
            except jax.errors.JaxRuntimeError as e:  # a layout whose step does not fit device memory
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                row["error"] = "out of memory: " + str(e).splitlines()[0][:300]
            rows.append(row)
            log(_format_row(row))
    if all(r["error"] for r in rows):
        raise UserError("no layout fits: " + " | ".join(f"{r['mesh']}: {r['error']}" for r in rows))
    _measured_bubbles(rows)
    return rows


def _measured_bubbles(rows: list[dict]) -> None:
    """A pipelined step does (R M + S - 1) / (R M) of the useful work (its fill and drain ticks compute on
    padding); against the first unpipelined layout of the same batch, which does the useful work
    alone, the measured bubble is 1 - t(unpipelined) / t(pipelined)."""
    for row in rows:
        ref = next(
            (r for r in rows if r["stages"] == 1 and not r["error"] and r["batch_size"] == row["batch_size"]), None
        )
        if row["stages"] > 1 and not row["error"] and ref is not None:
            row["bubble_measured"] = 1 - ref["step_ms"] / row["step_ms"]


def _format_row(r: dict) -> str:
    head = f"| {r['mesh']:>15} | {r['batch_size']:>5} |"
    if r["error"]:
        return f"{head} skipped: {r['error']}"
    return (
        f"{head} {r['compile_s']:>9.1f} | {r['step_ms']:>9.1f} | {r['tokens_per_s']:>10,.0f} | {r['mfu']:>6.1%} | "
        f"{r['arg_bytes'] / 2**20:>9.2f} | {r['temp_bytes'] / 2**20:>9.2f} | {r['peak_bytes'] / 2**20:>9.2f} | "
        f"{r['bubble_theory']:>6.1%} |"
    )


HEADER = (
    "|            mesh | batch | compile s |   ms/step |   tokens/s |    MFU |  args MiB |  temp MiB |  peak MiB | "
    "bubble |\n|-----------------|-------|-----------|-----------|------------|--------|-----------|-----------|"
    "-----------|--------|"
)


def write_outputs(
    rows: list[dict], out: Path, name: str = "sweep", columns=COLUMNS, title: str = "throughput"
) -> tuple[Path, Path]:
    """<out>/<name>.csv and <name>.png (tokens/s and memory per layout); `llm-jax plan --rank` writes its own."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in columns} for r in rows)
    return out / f"{name}.csv", _plot(rows, out / f"{name}.png", title)


def _plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib  # 0.5 s to import, for the PNG only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    labels = [f"{r['mesh']}\nb{r['batch_size']}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7, 1.4 * len(ok) + 3), 4))
    ax1.bar_label(ax1.bar(labels, [r["tokens_per_s"] for r in ok], color="tab:blue"), fmt="{:,.0f}", fontsize=8)
    ax1.set_ylabel("tokens/s")
    ax1.set_title(title)
    ax2.bar_label(
        ax2.bar(labels, [r["peak_bytes"] / 2**20 for r in ok], color="tab:orange", label="peak"),
        fmt="{:.2f}",
        fontsize=8,
    )
    ax2.bar(labels, [r["arg_bytes"] / 2**20 for r in ok], color="tab:green", label="arguments (state + batch)")
    ax2.set_ylabel("MiB per device")
    if len(ok) > 5:  # long layout labels would overlap
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    ax2.set_title("memory (compiled)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> None:
    cfg = load_config(args.config, args.overrides)
    meshes = parse_meshes(args.meshes)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [cfg.train.batch_size]
    except ValueError:
        batch_sizes = [0]
    if min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes {args.batch_sizes!r} must be comma-separated positive integers")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices, rules {cfg.mesh.rules}, "
        f"{args.steps} timed steps per layout\n{HEADER}",
        flush=True,
    )
    rows = run_sweep(cfg, meshes, batch_sizes, args.steps)
    csv_path, png_path = write_outputs(rows, Path(args.out or Path(cfg.run_dir) / "sweep").expanduser())
    for r in rows:
        if "bubble_measured" in r:
            print(
                f"{r['mesh']}, batch {r['batch_size']}: bubble {r['bubble_theory']:.1%} in theory, "
                f"{r['bubble_measured']:.1%} measured against the unpipelined step"
            )
    print(f"-> {csv_path}, {png_path}")
