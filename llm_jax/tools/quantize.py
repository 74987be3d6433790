"""`llm-jax quantize`: post-training, weight-only quantization of a run's linear layers into a new
run directory that `generate`, `chat` and `serve` read like any other (the formats:
llm_jax/model/dense.py). The command prints the held-out metrics of the float run (float32 and
bfloat16 compute) and of the quantized one, where the run's prepared data is still there.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax

from llm_jax import run as runs
from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.model.dense import GROUPS, param_bytes, quantize
from llm_jax.model.device import compute_dtype
from llm_jax.parallel.sharding import Layout, abstract_params, inference_layout, single_device_layout
from llm_jax.train.loop import evaluate
from llm_jax.train.objectives import objective_of
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps


def quantize_run(run_dir: str, mode: str, out_dir: str | None = None, mesh: str = "1,1,1", log=print) -> Path:
    """The float32 parameters are read split over --mesh and quantized where they lie: no device holds the
    whole float32 tree (the quantized tree comes out split by the same rules)."""
    if mode not in ("int8", *GROUPS):
        raise UserError(f"--mode {mode!r} must be int8, int4, fp4 or nvfp4")
    if runs.load_config_of(run_dir).model.moe.experts:
        raise UserError(f"{run_dir} is a mixture of experts: quantize does not take MoE weights yet")
    layout = inference_layout(runs.load_config_of(run_dir), mesh) or single_device_layout()
    run = runs.load_run(run_dir, layout)
    micro, shards = run.cfg.train.batch_size // run.cfg.train.grad_accum, layout.axis_size("batch")
    if micro % shards:
        raise UserError(
            f"--mesh {mesh}: the held-out evaluation's micro-batch of {micro} rows does not split over "
            f"{shards} batch shards (data x fsdp); choose a mesh whose data x fsdp divides {micro}"
        )
    cfg, params = run.cfg, run.params
    if cfg.model.quant != "none":
        raise UserError(f"{run_dir} is already quantized (model.quant={cfg.model.quant}); quantize the float run")
    out = Path(out_dir).expanduser() if out_dir else run.path.with_name(f"{run.path.name}-{mode}")
    if out.exists():
        raise UserError(f"{out} exists; remove it or give --out")
    m = cfg.model
    group = GROUPS.get(mode, 1)
    if m.d_model % group or m.mlp_dim % group:
        raise UserError(
            f"{mode} scales groups of {group} inputs: this model's d_model={m.d_model} and "
            f"mlp_dim={m.mlp_dim} must be multiples of {group}; use --mode int8"
        )
    qcfg = dataclasses.replace(cfg, run_dir=str(out), model=dataclasses.replace(m, quant=mode))
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_params(qcfg.model, layout))
    qparams = jax.jit(functools.partial(quantize, mode=mode), out_shardings=shardings)(params)
    f32, bf16 = (dataclasses.replace(cfg, model=dataclasses.replace(m, dtype=d)) for d in ("float32", "bfloat16"))
    metrics = {
        name: _held_out(c, p, run.path, layout)
        for name, c, p in (  # the quantized run computes in model.dtype
            ("float32", f32, params),
            ("bfloat16", bf16, params),
            (f"{mode} ({compute_dtype(m.dtype).name})", qcfg, qparams),
        )
    }

    runs.write_params_run(out, qcfg, qparams, run.step_dir.name, run.path)
    before, after = param_bytes(params), param_bytes(qparams)
    log(f"parameters: {before / 2**20:.2f} MiB float32 -> {after / 2**20:.2f} MiB {mode} ({after / before:.0%})")
    for name, m in metrics.items():
        if m:
            log(f"held-out {name}:{objective_of(cfg).val_line(m).removeprefix('  val |')}")
    log(f"-> {out}")
    return out


def _held_out(cfg: Config, params, run_dir: Path, layout: Layout) -> dict | None:
    """The objective's metrics over the run's validation split (None if its prepared data is gone)."""
    if not (runs.data_dir(run_dir) / "meta.json").is_file():
        return None
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    data = objective_of(cfg).prepare(cfg, run_dir, log=lambda *_: None)
    unpipelined = dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, pipeline=1, microbatches=0, pipeline_repeats=1)
    )
    steps = make_steps(
        unpipelined,
        layout,
        make_optimizer(cfg.optim, 1),
        data.tokenizer.token_bytes(cfg.model.vocab_size),
        data.train[0],
    )
    return evaluate(unpipelined, steps, jax.device_put(params, steps.state_sharding.params), data)
