"""The KV cache a decoding model writes its keys and values into and attends over, in two forms.

- contiguous (`init_cache`): {"k": [n_layers, batch, n_kv_heads, seq_len, head_dim], "v": [n_layers,
  batch, n_kv_heads, head_dim, seq_len]}, one full-length row per sequence (llm_jax/inference/generate.py).
- paged (`init_pages`): {"k": [n_layers, blocks, n_kv_heads, block, head_dim], "v": [n_layers, blocks,
  n_kv_heads, head_dim, block], "table": [batch, seq_len / block]}: a pool of fixed-size blocks, and
  per sequence the blocks that hold its positions 0, block, 2 block, ... (vLLM's PagedAttention
  layout; llm_jax/inference/paged.py hands the blocks out). Block 0 is scratch: a table's unused
  entries point at it, and padding and idle rows write there; no sequence reads it.

Values are stored transposed in both, so that both of the attention's matmuls contract their operands'
last axes and read the cache as it lies (in [.., seq_len, head_dim] XLA:CPU copied out a transposed
block of each per layer and step: 3.9 -> 3.1 ms a step at batch 16). Split like the activations: rows
over the batch axes and kv heads over tensor; the paged pool's blocks are shared by all rows, so only
its kv heads are split. On CPU the serving layers are unstacked (Transformer.serving): the cache is then
a list of each layer's dict without the layers axis (the paged table repeated in each).
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
PAGE_AXES = {"k": (None, None, "kv_heads", None, "head_dim"), "v": (None, None, "kv_heads", "head_dim", None)}


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


def init_pages(cfg: ModelConfig, blocks: int, block: int, per_layer: bool = False) -> Cache:
    """A pool of `blocks` zero blocks of `block` positions (block 0 the scratch one), without tables
    (`with_table` adds the batch's)."""
    k = (cfg.n_layers, blocks, cfg.n_kv_heads, block, cfg.head_dim)
    shapes = {"k": k, "v": (*k[:3], cfg.head_dim, block)}
    return _zeros(shapes, PAGE_AXES, cache_dtype(cfg), cfg.n_layers, per_layer)


def with_table(pages: Cache, table: jax.Array) -> Cache:
    """The pool with a batch's block table [B, seq_len / block] (int32) attached, as the model reads it."""
    if isinstance(pages, list):
        return [dict(layer, table=table) for layer in pages]
    return dict(pages, table=table)


def without_table(cache: Cache) -> Cache:
    if isinstance(cache, list):
        return [{"k": layer["k"], "v": layer["v"]} for layer in cache]
    return {"k": cache["k"], "v": cache["v"]}


def _zeros(shapes: dict, axes: dict, dtype, n_layers: int, per_layer: bool) -> Cache:
    if per_layer:
        zeros = {
            name: nn.with_logical_constraint(jnp.zeros(s[1:], dtype), axes[name][1:]) for name, s in shapes.items()
        }
        return [dict(zeros) for _ in range(n_layers)]
    return {name: nn.with_logical_constraint(jnp.zeros(s, dtype), axes[name]) for name, s in shapes.items()}


def write_and_attend(
    cache: dict, layer, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache_index
) -> tuple[jax.Array, dict]:
    """Writes this layer's new keys and values and attends the queries to every cached position <= their own.

    q [B, T, N, H], k / v [B, T, K, H] at positions [B, T]; cache: the whole stacked cache with this
    layer's index `layer`, or one layer's own (layer None). Contiguous caches write at cache_index (a
    scalar or [B]) + 0..T-1; paged ones at `positions`, where a position < 0 (padding) goes to the
    scratch block. -> (attention output [B, T, N, H] in q's dtype, the updated cache)."""
    lead, all_ = (() if layer is None else (layer,)), slice(None)
    paged = "table" in cache
    if paged:
        table, block = cache["table"], cache["k"].shape[-2]
        entry = jnp.clip(positions // block, 0, table.shape[1] - 1)
        blocks = jnp.where(positions >= 0, jnp.take_along_axis(table, entry, axis=1), 0)  # [B, T]
        offsets = positions % block
        k_at = cache["k"].at[(*lead, blocks, all_, offsets, all_)]  # [B, T] x [K, H]
        v_at = cache["v"].at[(*lead, blocks, all_, all_, offsets)]
        axes = PAGE_AXES
    else:
        index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (q.shape[0],))
        rows = jnp.arange(q.shape[0])[:, None]  # [B, 1], with the positions [B, T] written
        at = index[:, None] + jnp.arange(q.shape[1])
        k_at = cache["k"].at[(*lead, rows, all_, at, all_)]
        v_at = cache["v"].at[(*lead, rows, all_, all_, at)]
        axes = CACHE_AXES
    axes = {name: value[1 - len(lead) :] for name, value in axes.items()}  # without layers: [1:]
    cache = dict(
        cache,
        k=nn.with_logical_constraint(k_at.set(k.astype(cache["k"].dtype)), axes["k"]),
        v=nn.with_logical_constraint(v_at.set(v.astype(cache["v"].dtype)), axes["v"]),
    )
    keys, values = (cache[name] if layer is None else cache[name][layer] for name in ("k", "v"))
    if paged:  # each row's blocks in table order: [B, M, K, block, H] -> [B, K, M x block, H] (values: transposed)
        b, m = cache["table"].shape
        keys = jnp.moveaxis(keys[cache["table"]], 1, 2).reshape(b, keys.shape[1], m * keys.shape[2], -1)
        values = jnp.moveaxis(values[cache["table"]], 1, 3).reshape(b, values.shape[1], values.shape[2], -1)
    ct = keys.dtype  # the attention over the cache computes in its dtype (float32 on CPU: cache_dtype)
    return cached_attention(q.astype(ct), keys, values, positions).astype(q.dtype), cache
