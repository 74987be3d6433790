"""`llm-jax quantize`: post-training, weight-only int8 quantization of a run's linear layers.

Each linear weight [layers, *in, *out] becomes int8 values and a float32 scale per layer and output
channel, scale = max |w| over the inputs / 127, so every channel uses the full int8 range; the
model multiplies its matmul output by the scale (model.quant=int8, transformer._dense). Norms and
the embedding / LM head stay float32. The quantized run is a new run directory that `generate`
and `chat` read like any other; the command prints held-out bits per byte before and after.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_jax.errors import UserError

IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}  # contracted axes


def quantize_int8(params: dict) -> dict:
    """f32 params -> the int8 tree of model.quant=int8 (layer weights [L, *in, *out] -> int8 + scale [L, *out])."""
    layers = dict(params["layers"])
    for name, in_dims in IN_DIMS.items():
        w = jnp.asarray(layers.pop(name), jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=tuple(range(1, 1 + in_dims))) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.round(w / scale.reshape(scale.shape[:1] + (1,) * in_dims + scale.shape[1:]))
        layers[name] = jnp.clip(q, -127, 127).astype(jnp.int8)
        layers[f"{name}_scale"] = scale
    return {**params, "layers": layers}


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def quantize_run(run_dir: str, mode: str, out_dir: str | None = None, log=print) -> Path:
    from llm_jax.cli import load_run
    from llm_jax.config import save_config

    if mode != "int8":
        raise UserError(f"--mode {mode!r}: only int8 is implemented")
    cfg, params, _, step_dir = load_run(run_dir)
    if cfg.model.quant != "none":
        raise UserError(f"{run_dir} is already quantized (model.quant={cfg.model.quant}); quantize the float run")
    run = Path(run_dir).expanduser()
    out = Path(out_dir).expanduser() if out_dir else run.with_name(f"{run.name}-{mode}")
    if out.exists():
        raise UserError(f"{out} exists; remove it or give --out")
    qcfg = dataclasses.replace(cfg, run_dir=str(out), model=dataclasses.replace(cfg.model, quant=mode))
    qparams = quantize_int8(params)
    metrics = {name: _held_out(c, p, run) for name, c, p in (("float32", cfg, params), (mode, qcfg, qparams))}

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer.vocab"):
        if (run / name).is_file():
            shutil.copyfile(run / name, tmp / name)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((tmp / "checkpoints" / step_dir.name / "state").absolute(), {"params": qparams})
    save_config(qcfg, tmp / "config.yaml")
    tmp.rename(out)
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
    token_bytes = np.zeros(cfg.model.vocab_size, np.int32)
    token_bytes[:data.tokenizer.vocab_size] = data.tokenizer.token_bytes()
    one_device = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, pipeline=1, microbatches=0))
    steps = make_steps(one_device, layout, make_optimizer(cfg.optim, 1), token_bytes, data.train[0])
    with layout.activate():
        params = jax.device_put(params, layout.replicated())
    return evaluate(one_device, steps, params, data)
