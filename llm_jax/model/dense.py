"""Linear layers and the formats of their weights: float32, or weight-only int8 / int4 / fp4 / nvfp4.

The quantized formats (model.quant) are written by `quantize` and read by `dense`:
- int8: a scale per layer and output channel, max |w| over the inputs / 127;
- int4: a scale per layer, group of 32 inputs (GROUPS) and output channel, max |w| over the group / 7
  (symmetric, [-7, 7]; stored as jnp.int4, half a byte each);
- fp4: MXFP4 (the OCP microscaling format): e2m1 values (jnp.float4_e2m1fn: 0, 0.5, 1, 1.5, 2, 3, 4, 6
  and their negatives) sharing a power-of-two scale (jnp.float8_e8m0fnu, one byte) per group of
  32 inputs and output channel: 2^(floor(log2 max|w|) - 2), so the largest weight lands in
  [4, 8) and saturates at 6; rounding to nearest, ties to even. 4.25 bits a weight.
- nvfp4: NVIDIA's NVFP4: e2m1 values with a scale per group of 16 inputs and output channel in
  jnp.float8_e4m3fn (3 mantissa bits, so the largest weight of a group lands near 6 rather than
  anywhere in [4, 8)), times a float32 scale per layer and weight, max|w| / (6 x 448), which keeps the
  group scales inside e4m3's range. 4.5 bits a weight.
The integer scales are set so each group's largest weight lands on the largest integer. Norms and
the embedding / LM head are not quantized. On hardware without FP4 matmuls (all but NVIDIA Blackwell's
tensor cores, today) fp4 weights are dequantized to the compute dtype for the matmul, like int4: they
save memory and bandwidth, not FLOPs.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.context_parallel import context_shards
from llm_jax.model.device import compute_dtype, cpu_rows, on_cpu, saved, transposed

GROUPS = {"int4": 32, "fp4": 32, "nvfp4": 16}  # model.quant: inputs that share a scale
QUANT_DTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp4": jnp.float4_e2m1fn, "nvfp4": jnp.float4_e2m1fn}
SCALE_DTYPES = {"int4": jnp.float32, "fp4": jnp.float8_e8m0fnu, "nvfp4": jnp.float8_e4m3fn}
FP4_MAX, E4M3_MAX = 6.0, 448.0  # the largest e2m1 and e4m3 values
IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}  # each weight's contracted axes


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None):
    """A float32 parameter named by its logical axes: normal(std) init, ones for std None (norm
    scales), zeros for std 0 (biases)."""
    init = nn.initializers.ones if std is None else nn.initializers.normal(std) if std else nn.initializers.zeros
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def matmul(x: jax.Array, w: jax.Array, in_dims: int, dtype) -> jax.Array:
    """Contracts the last `in_dims` axes of x with the first `in_dims` axes of w: `dtype` inputs,
    float32 accumulation, result in `dtype`.

    Both sides are flattened to one 2-D matmul: XLA:CPU runs the backward pass of a 2-D dot about
    1.6x faster than that of the equivalent 3-D einsum (measured: SwiGLU MLP fwd+bwd, 8 x 256 x 384,
    128 ms vs 208 ms); on accelerators the reshapes are free. Not with a sequence split over the
    context axis: rows of [batch x length] would not be contiguous per device, and XLA would gather
    the whole sequence to flatten it, so x keeps its leading axes there.
    """
    lead, k = x.shape[: x.ndim - in_dims], math.prod(x.shape[x.ndim - in_dims :])
    out = w.shape[in_dims:]
    flat = context_shards()[1] == 1
    x2, w2 = (x.reshape(-1, k) if flat else x.reshape(*lead, k)).astype(dtype), w.reshape(k, -1)
    rows = cpu_rows(x2)
    if jnp.issubdtype(w2.dtype, jnp.floating):
        y = _trained_dot(rows, w2, flat and on_cpu() and x2.dtype == jnp.bfloat16)
    else:  # quantized weights: inference only
        y = jnp.dot(rows, w2.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    return y[: x2.shape[0]].reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _trained_dot(x: jax.Array, w: jax.Array, transposed_input: bool) -> jax.Array:
    """x [M, K] (or [..., K]) @ w [K, N] -> [M, N]: x's dtype (the compute dtype) in and out, w float32 (the master
    weight, cast for the matmul), float32 accumulation in all three matmuls of forward and backward.

    Written out because autodiff's backward would take the float32 gradient of the float32
    accumulator, so its two matmuls would run in float32 (XLA:CPU: ~330 against ~1,600 GFLOP/s
    in bfloat16 on a Xeon with AMX). On CPU in bfloat16 the forward also saves x transposed, [K, M]:
    d w = x^T @ g is then a plain [K, M] x [M, N] matmul, the only layout XLA:CPU's bfloat16 kernels
    take for it (contracting the leading axes of both ran at ~250 GFLOP/s; see device.transposed)."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _trained_dot_fwd(x, w, transposed_input):
    y = saved(jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype), "matmul_out")
    return y, (saved(transposed(x), "matmul_input_t") if transposed_input else x, w)


def _trained_dot_bwd(transposed_input, res, g):
    x, w = res
    rows = tuple(range(g.ndim - 1))
    dx = jax.lax.dot_general(
        g, w.astype(g.dtype), (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    contract = (1,) if transposed_input else rows  # x is [K, M] or [M, K] (or [..., K])
    dw = jax.lax.dot_general(x, g, ((contract, rows), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(g.dtype), dw.astype(w.dtype)


_trained_dot.defvjp(_trained_dot_fwd, _trained_dot_bwd)


def dense(
    module: nn.Module, name: str, x: jax.Array, shape: tuple[int, ...], axes: tuple[str, ...], std: float, in_dims: int
) -> jax.Array:
    """x times the weight `name` [*in, *out], contracting x's last `in_dims` axes. Quantized weights
    (quantize below) are stored as `name` plus a float32 `name_scale`:
    - int8: a scale per output channel [*out], applied to the matmul's output (no dequantized weight);
    - int4, fp4, nvfp4: a scale per group of GROUPS[quant] inputs and output channel [K / group, *out]
      (nvfp4: times the layer's `name_tensor_scale`); the weight is dequantized to float for the matmul."""
    cfg, dt = module.cfg, compute_dtype(module.cfg.dtype)
    if cfg.quant == "none":
        return matmul(x, param(module, name, shape, axes, std), in_dims, dt)
    out_shape, out_axes = shape[in_dims:], axes[in_dims:]
    dtype = QUANT_DTYPES[cfg.quant]
    q = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros_init(), axes), shape, dtype)
    if cfg.quant == "int8":
        scale = param(module, f"{name}_scale", out_shape, out_axes, None)
        y = matmul(x, q, in_dims, dt)  # int8 values are exact in bf16 and f32
        return (y.astype(jnp.float32) * scale).astype(y.dtype)
    group = GROUPS[cfg.quant]
    groups = math.prod(shape[:in_dims]) // group
    init = nn.with_logical_partitioning(nn.initializers.ones, (None, *out_axes))
    scale = module.param(f"{name}_scale", init, (groups, *out_shape), SCALE_DTYPES[cfg.quant]).astype(jnp.float32)
    if cfg.quant == "nvfp4":
        scale = scale * param(module, f"{name}_tensor_scale", (), (), None)
    w = q.astype(jnp.float32).reshape(groups, group, -1) * scale.reshape(groups, 1, -1)
    return matmul(x, w.reshape(shape), in_dims, dt)


def quantize(params: dict, mode: str) -> dict:
    """f32 params -> the tree of model.quant=mode: each layer weight [L, *in, *out] -> the mode's values of
    the same shape and `<name>_scale` [L, *out] (int8) or [L, K / group, *out] (int4, fp4, nvfp4; K = the
    inputs), and for nvfp4 `<name>_tensor_scale` [L]."""
    layers = dict(params["layers"])
    for name, in_dims in IN_DIMS.items():
        w = jnp.asarray(layers.pop(name), jnp.float32)
        lead, out = w.shape[: 1 + in_dims], w.shape[1 + in_dims :]
        group = math.prod(lead[1:]) if mode == "int8" else GROUPS[mode]
        grouped = w.reshape(w.shape[0], -1, group, math.prod(out))  # [L, groups, group, N]
        top = jnp.max(jnp.abs(grouped), axis=2, keepdims=True)
        if mode == "fp4":  # a power of two putting the largest weight in [4, 8)
            scale = jnp.where(top > 0, jnp.exp2(jnp.floor(jnp.log2(jnp.where(top > 0, top, 1.0))) - 2), 1.0)
            q = jnp.clip(grouped / scale, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn)
            scale = scale.astype(jnp.float8_e8m0fnu)  # exact: a power of two
        elif mode == "nvfp4":  # the group's largest weight at ~6 by an e4m3 scale, times the layer's scale
            tensor = jnp.max(top, axis=(1, 3), keepdims=True) / (FP4_MAX * E4M3_MAX)
            tensor = jnp.where(tensor > 0, tensor, 1.0)
            scale = jnp.where(top > 0, top / FP4_MAX / tensor, 1.0).astype(jnp.float8_e4m3fn)
            step = scale.astype(jnp.float32) * tensor  # 0 for a group below e4m3's least (~2e-6 x the layer's max)
            q = jnp.where(step > 0, jnp.clip(grouped / jnp.where(step > 0, step, 1.0), -FP4_MAX, FP4_MAX), 0.0)
            q = q.astype(jnp.float4_e2m1fn)
            layers[f"{name}_tensor_scale"] = tensor.reshape(w.shape[0])
        else:
            levels = 127 if mode == "int8" else 7
            scale = jnp.where(top > 0, top / levels, 1.0)
            q = jnp.clip(jnp.round(grouped / scale), -levels, levels).astype(jnp.int8).astype(QUANT_DTYPES[mode])
        layers[name] = q.reshape(w.shape)
        scale = scale.reshape(w.shape[0], -1, *out)
        layers[f"{name}_scale"] = scale[:, 0] if mode == "int8" else scale
    return {**params, "layers": layers}


def param_bytes(params) -> int:
    half = (jnp.int4, jnp.float4_e2m1fn)  # half a byte each
    return sum(x.size * (0.5 if x.dtype in half else x.dtype.itemsize) for x in jax.tree_util.tree_leaves(params))


def inference_params(cfg: ModelConfig, params, platform: str | None = None):
    """The weight matrices, embedding / LM head included, cast to the compute dtype once (norm scales
    and quantization scales stay float32): a decode step then reads half the bytes and converts
    nothing (bfloat16 on 2 Xeon cores, the demo model: see benchmarks/decode.py). Abstract parameters
    (jax.ShapeDtypeStruct, for `platform`) come back abstract, with their shardings."""
    dtype = compute_dtype(cfg.dtype, platform)
    if dtype == jnp.float32:
        return params

    def cast(path, x):
        name = jax.tree_util.keystr(path)  # stacked norm scales are [n_layers, d]: 2-D, not matrices
        matrix = x.dtype == jnp.float32 and x.ndim >= 2 and not any(s in name for s in ("scale", "norm", "bias"))
        if not matrix:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)
