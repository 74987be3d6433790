"""`llm-jax quantize`: post-training, weight-only quantization of a run's linear layers.

Each linear weight [layers, *in, *out] becomes integers and float32 scales (transformer._dense):
- int8: a scale per layer and output channel, max |w| over the inputs / 127;
- int4: a scale per layer, group of 32 inputs and output channel, max |w| over the group / 7
  (symmetric, [-7, 7]; stored as jnp.int4, half a byte each).
Each scale is set so its largest weight lands on the largest integer. Norms and the embedding /
LM head stay float32. The quantized run is a new run directory that `generate`, `chat` and `serve`
read like any other; the command prints held-out bits per byte of the float run (float32 and
bfloat16 compute) and of the quantized one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError
from llm_jax.model.transformer import INT4_GROUP

IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}  # contracted axes


def quantize(params: dict, mode: str) -> dict:
    """f32 params -> the tree of model.quant=mode: each layer weight [L, *in, *out] -> integers of the
    same shape and `<name>_scale` [L, *out] (int8) or [L, K / group, *out] (int4, K = the inputs)."""
    layers = dict(params["layers"])
    for name, in_dims in IN_DIMS.items():
        w = jnp.asarray(layers.pop(name), jnp.float32)
        lead, out = w.shape[:1 + in_dims], w.shape[1 + in_dims:]
        group, top, dtype = (math.prod(lead[1:]), 127, jnp.int8) if mode == "int8" else (INT4_GROUP, 7, jnp.int4)
        grouped = w.reshape(w.shape[0], -1, group, math.prod(out))         # [L, groups, group, N]
        scale = jnp.max(jnp.abs(grouped), axis=2, keepdims=True) / top
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(grouped / scale), -top, top).astype(jnp.int8)
        layers[name] = q.reshape(w.shape).astype(dtype)
        scale = scale.reshape(w.shape[0], -1, *out)
        layers[f"{name}_scale"] = scale[:, 0] if mode == "int8" else scale
    return {**params, "layers": layers}


def param_bytes(params) -> int:
    return sum(x.size * (0.5 if x.dtype == jnp.int4 else x.dtype.itemsize) for x in jax.tree_util.tree_leaves(params))


def quantize_run(run_dir: str, mode: str, out_dir: str | None = None, log=print) -> Path:
    from llm_jax.cli import load_run
    from llm_jax.train.checkpoint import write_params_run

    if mode not in ("int8", "int4"):
        raise UserError(f"--mode {mode!r} must be int8 or int4")
    cfg, params, _, step_dir = load_run(run_dir)
    if cfg.model.quant != "none":
        raise UserError(f"{run_dir} is already quantized (model.quant={cfg.model.quant}); quantize the float run")
    run = Path(run_dir).expanduser()
    out = Path(out_dir).expanduser() if out_dir else run.with_name(f"{run.name}-{mode}")
    if out.exists():
        raise UserError(f"{out} exists; remove it or give --out")
    m = cfg.model
    if mode == "int4" and (m.d_model % INT4_GROUP or m.mlp_dim % INT4_GROUP):
        raise UserError(f"int4 scales groups of {INT4_GROUP} inputs: this model's d_model={m.d_model} and "
                        f"mlp_dim={m.mlp_dim} must be multiples of {INT4_GROUP}; use --mode int8")
    qcfg = dataclasses.replace(cfg, run_dir=str(out), model=dataclasses.replace(m, quant=mode))
    qparams = quantize(params, mode)
    f32, bf16 = (dataclasses.replace(cfg, model=dataclasses.replace(m, dtype=d)) for d in ("float32", "bfloat16"))
    metrics = {name: _held_out(c, p, run) for name, c, p in  # the quantized run computes in model.dtype
               (("float32", f32, params), ("bfloat16", bf16, params), (f"{mode} ({m.dtype})", qcfg, qparams))}

    write_params_run(out, qcfg, qparams, step_dir.name, [run / "tokenizer.model", run / "tokenizer.vocab"])
    before, after = param_bytes(params), param_bytes(qparams)
    log(f"parameters: {before / 2**20:.2f} MiB float32 -> {after / 2**20:.2f} MiB {mode} ({after / before:.0%})")
    for name, m in metrics.items():
        if m:
            log(f"held-out {name}: loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | bpb {m['bpb']:.4f}")
    log(f"-> {out}")
    return out


def _held_out(cfg, params, run: Path) -> dict | None:
    """Loss, perplexity and bits per byte over the run's validation split (None if its data is gone)."""
    from llm_jax import sharding
    from llm_jax.data.prepare import prepare_data
    from llm_jax.train.loop import evaluate
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    if cfg.train.objective != "pretrain" or not (run / "data" / "meta.json").is_file():
        return None
    data = prepare_data(dataclasses.replace(cfg, run_dir=str(run)), run, log=lambda *_: None)
    layout = sharding.single_device_layout()
    one_device = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, pipeline=1, microbatches=0))
    steps = make_steps(one_device, layout, make_optimizer(cfg.optim, 1),
                       data.tokenizer.token_bytes(cfg.model.vocab_size), data.train[0])
    with layout.activate():
        params = jax.device_put(params, layout.replicated())
    return evaluate(one_device, steps, params, data)
