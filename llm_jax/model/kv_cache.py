"""The contiguous KV cache a decoding model writes its keys and values into and attends over:
{"k": [n_layers, batch, n_kv_heads, seq_len, head_dim], "v": [n_layers, batch, n_kv_heads, head_dim,
seq_len]}, one full-length row per sequence (llm_jax/inference/generate.py; the paged one that
continuous batching uses: kv_pages.py).

Values are stored transposed, so that both of the attention's matmuls contract their operands' last
axes and read the cache as it lies (in [.., seq_len, head_dim] XLA:CPU copied out a transposed block
of each per layer and step: 3.9 -> 3.1 ms a step at batch 16). Split like the activations: rows over
the batch axes and kv heads over tensor. On CPU the serving layers are unstacked (Transformer.serving):
the cache is then a list of each layer's dict without the layers axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.attention import cached_attention
from llm_jax.model.device import compute_dtype, on_cpu

Cache = dict | list
CACHE_AXES = {"k": (None, "batch", "kv_heads", None, "head_dim"), "v": (None, "batch", "kv_heads", "head_dim", None)}


def cache_dtype(cfg: ModelConfig):
    """The compute dtype, but float32 on CPU, where XLA converts a bfloat16 cache to float32 for the
    attention's small matmuls and writes into it through float32 too (a bfloat16 cache made the demo
    model's decode step at batch 16 1.3x slower)."""
    return jnp.float32 if on_cpu() else compute_dtype(cfg.dtype)


def init_cache(cfg: ModelConfig, batch: int, per_layer: bool = False) -> Cache:
    """Zeros in CACHE_AXES's layout, split over the mesh where a mesh and rules are active. per_layer
    (the unstacked serving layers on CPU): the attention then reads each layer's cache without copying
    it out of the stack (3.4 -> 3.0 ms a step at batch 16)."""
    return _zeros(cache_shapes(cfg, batch), CACHE_AXES, cache_dtype(cfg), cfg.n_layers, per_layer)


def cache_shapes(cfg: ModelConfig, batch: int) -> dict[str, tuple[int, ...]]:
    k = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.seq_len, cfg.head_dim)
    return {"k": k, "v": (*k[:3], cfg.head_dim, cfg.seq_len)}


def _zeros(shapes: dict, axes: dict, dtype, n_layers: int, per_layer: bool) -> Cache:
    if per_layer:
        zeros = {
            name: nn.with_logical_constraint(jnp.zeros(s[1:], dtype), axes[name][1:]) for name, s in shapes.items()
        }
        return [dict(zeros) for _ in range(n_layers)]
    return {name: nn.with_logical_constraint(jnp.zeros(s, dtype), axes[name]) for name, s in shapes.items()}


def write_and_attend(
    cache: dict, layer, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache_index, end=None
) -> tuple[jax.Array, dict]:
    """Writes this layer's new keys and values at cache_index (a scalar or [B]) + 0..T-1 and attends the
    queries to every cached position <= their own; `end` (an int, where known when tracing: Block)
    bounds the slots read.

    q [B, T, N, H], k / v [B, T, K, H] at positions [B, T]; cache: the whole stacked cache with this
    layer's index `layer`, or one layer's own (layer None). -> (attention output [B, T, N, H] in q's
    dtype, the updated cache)."""
    lead, all_ = (() if layer is None else (layer,)), slice(None)
    index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (q.shape[0],))
    rows = jnp.arange(q.shape[0])[:, None]  # [B, 1], with the positions [B, T] written
    at = index[:, None] + jnp.arange(q.shape[1])
    axes = {name: value[1 - len(lead) :] for name, value in CACHE_AXES.items()}  # without layers: [1:]
    cache = dict(
        cache,
        k=nn.with_logical_constraint(
            cache["k"].at[(*lead, rows, all_, at, all_)].set(k.astype(cache["k"].dtype)), axes["k"]
        ),
        v=nn.with_logical_constraint(
            cache["v"].at[(*lead, rows, all_, all_, at)].set(v.astype(cache["v"].dtype)), axes["v"]
        ),
    )
    keys, values = (cache[name] if layer is None else cache[name][layer] for name in ("k", "v"))
    # A prefill from a position known when tracing (generate's and the static server's from 0) sees no
    # slot past its chunk's end, so it attends to those only, not the whole context: the demo's prefill of
    # 16 prompts of 16, bf16, Zen 4: 19.9 -> 14.8 ms.
    if end is not None:
        keys, values = keys[:, :, :end], values[..., :end]
    ct = keys.dtype  # the attention over the cache computes in its dtype (float32 on CPU: cache_dtype)
    return cached_attention(q.astype(ct), keys, values, positions).astype(q.dtype), cache
