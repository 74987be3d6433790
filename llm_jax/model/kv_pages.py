"""The paged KV cache (vLLM's PagedAttention layout): a pool of fixed-size blocks, and per sequence a
table of the blocks that hold its positions 0, block, 2 block, ... (llm_jax/inference/paged.py hands
the blocks out). Two layouts:

- gathered (CPU, GPU): {"k": [n_layers, blocks, n_kv_heads, block, head_dim], "v": [n_layers, blocks,
  n_kv_heads, head_dim, block]} (values transposed, as in kv_cache.py); the attention gathers each
  row's blocks in table order and attends over them in plain JAX.
- kernel (`paged_kernel`: TPUs): {"k", "v": [n_kv_heads, n_layers, blocks, block, head_dim]}, the layout
  of jax's Pallas paged-attention kernel, which every one-token decode step runs: a layer's blocks are
  the pool's blocks from layer x blocks on, read in place (the table offset), no layer sliced out.

Split over the mesh like the rows that use them: the pool's blocks over the batch axes, so that batch
shard j holds blocks [j P, (j + 1) P) and its rows' tables point only there (PagedModel allocates so),
and kv heads over tensor; the write and the attention run per device in a shard_map, on local blocks
(a table entry modulo P). Each shard's first block is scratch: a table's unused entries (0) point at
it, and padding and idle rows (position -1) write there; no sequence reads it. On CPU the serving
layers are unstacked: the pool is then a list of each layer's dict (layers axis dropped, or 1 in the
kernel layout), the batch's table in each.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.attention import cached_attention
from llm_jax.model.device import target_device
from llm_jax.model.kv_cache import Cache, cache_dtype

# blocks over the batch axes, kv heads over tensor; positions and head_dim whole on each device
PAGE_AXES = {"k": (None, "batch", "kv_heads", None, None), "v": (None, "batch", "kv_heads", None, None)}
KERNEL_PAGE_AXES = ("kv_heads", None, "batch", None, None)  # [K, L, blocks, block, H], k and v alike
KERNEL_SPAN = 512  # positions one grid step of the paged kernel reads (pages_per_compute_block x block)


def paged_kernel(cfg: ModelConfig) -> bool:
    """Whether paged decoding runs the Pallas paged-attention kernel (jax.experimental.pallas.ops.tpu):
    on TPUs with model.attention auto or splash and 128-multiple heads (Mosaic's tiles: a 16-wide head
    does not lower); with model.attention=splash on CPU it runs interpreted (the tests); GPUs gather."""
    platform = target_device().platform
    if platform == "cpu":
        return cfg.attention == "splash"
    return platform == "tpu" and cfg.attention in ("auto", "splash") and cfg.head_dim % 128 == 0


def page_shapes(cfg: ModelConfig, blocks: int, block: int) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """The stacked pool's arrays: name -> (shape, logical axes), in the kernel's layout where it runs."""
    if paged_kernel(cfg):
        shape = (cfg.n_kv_heads, cfg.n_layers, blocks, block, cfg.head_dim)
        return dict.fromkeys(("k", "v"), (shape, KERNEL_PAGE_AXES))
    k = (cfg.n_layers, blocks, cfg.n_kv_heads, block, cfg.head_dim)
    return {"k": (k, PAGE_AXES["k"]), "v": ((*k[:3], cfg.head_dim, block), PAGE_AXES["v"])}


def init_pages(cfg: ModelConfig, blocks: int, block: int, per_layer: bool = False) -> Cache:
    """A pool of `blocks` zero blocks of `block` positions (block 0 of each batch shard the scratch one),
    without tables (`with_table` adds the batch's)."""
    kernel, dtype = paged_kernel(cfg), cache_dtype(cfg)
    pool = {}
    for name, (shape, axes) in page_shapes(cfg, blocks, block).items():
        if per_layer:  # each layer's own: the layers axis dropped (kept, of size 1, in the kernel's layout)
            shape, axes = ((shape[0], 1, *shape[2:]), axes) if kernel else (shape[1:], axes[1:])
        pool[name] = nn.with_logical_constraint(jnp.zeros(shape, dtype), axes)
    return [dict(pool) for _ in range(cfg.n_layers)] if per_layer else pool


def with_table(pages: Cache, table: jax.Array) -> Cache:
    """The pool with a batch's block table [B, seq_len / block] (int32) attached, as the model reads it."""
    if isinstance(pages, list):
        return [dict(layer, table=table) for layer in pages]
    return dict(pages, table=table)


def without_table(cache: Cache) -> Cache:
    if isinstance(cache, list):
        return [{"k": layer["k"], "v": layer["v"]} for layer in cache]
    return {"k": cache["k"], "v": cache["v"]}


def paged_write_and_attend(
    cache: dict, layer, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, kernel: bool
) -> tuple[jax.Array, dict]:
    """kv_cache.write_and_attend for a pool with its table: writes k / v [B, T, K, H] at positions [B, T]
    (< 0: the scratch block) and attends q [B, T, N, H] to each row's positions <= its own; layer: the
    stacked pool's layer index, or None (one layer's pool). kernel: paged_kernel's answer. Per device
    under a mesh (rows and blocks over the batch axes, kv heads over tensor) -> (out [B, T, N, H], cache)."""
    stacked = layer is not None
    local = _kernel_local if kernel else _gathered_local
    index = jnp.asarray(layer if stacked else 0, jnp.int32)
    args = (cache["k"], cache["v"], cache["table"], q, k, v, positions, index)

    def run(pool_k, pool_v, table, q, k, v, positions, index):
        blocks = pool_k.shape[2 if kernel else int(stacked)]  # this device's blocks (of each layer)
        table = table % blocks  # pool-wide entries -> this shard's (its blocks are its own)
        return local(pool_k, pool_v, table, q, k, v, positions, index if stacked else None)

    if jax.sharding.get_abstract_mesh().empty:
        out, pool_k, pool_v = run(*args)
    else:
        spec = lambda axes: jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(axes))  # noqa: E731
        if kernel:
            pool = (KERNEL_PAGE_AXES,) * 2
        else:
            pool = tuple(PAGE_AXES[name][0 if stacked else 1 :] for name in ("k", "v"))
        pool_specs = tuple(spec(axes) for axes in pool)
        # whole sequences and heads on each device, whatever the rules say of length and head_dim
        q_spec, kv_spec = spec(("batch", None, "heads", None)), spec(("batch", None, "kv_heads", None))
        rows = (spec(("batch", None)), q_spec, kv_spec, kv_spec, spec(("batch", None)), spec(()))
        out, pool_k, pool_v = jax.shard_map(
            run, in_specs=(*pool_specs, *rows), out_specs=(q_spec, *pool_specs), check_vma=False
        )(*args)
    return out, dict(cache, k=pool_k, v=pool_v)


def _slots(table: jax.Array, positions: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Where positions [B, T] lie in this device's blocks (a local table): (block [B, T], offset [B, T]);
    padding (position < 0) goes to the scratch block 0."""
    entry = jnp.clip(positions // block, 0, table.shape[1] - 1)
    at = jnp.where(positions >= 0, jnp.take_along_axis(table, entry, axis=1), 0)
    return at, positions % block


def _gathered_local(pool_k, pool_v, table, q, k, v, positions, layer):
    """The gathered layout on one device: pool_k [(L,) P, K, block, H], pool_v [(L,) P, K, H, block]."""
    lead, all_ = (() if layer is None else (layer,)), slice(None)
    block = pool_k.shape[-2]
    at, offsets = _slots(table, positions, block)
    pool_k = pool_k.at[(*lead, at, all_, offsets, all_)].set(k.astype(pool_k.dtype))  # [B, T] x [K, H]
    pool_v = pool_v.at[(*lead, at, all_, all_, offsets)].set(v.astype(pool_v.dtype))
    keys, values = (pool if layer is None else pool[layer] for pool in (pool_k, pool_v))
    b, m = table.shape  # each row's blocks in table order: [B, M, K, block, H] -> [B, K, M x block, H]
    keys = jnp.moveaxis(keys[table], 1, 2).reshape(b, keys.shape[1], m * block, -1)
    values = jnp.moveaxis(values[table], 1, 3).reshape(b, values.shape[1], values.shape[2], -1)  # [B, K, H, S]
    out = cached_attention(q.astype(keys.dtype), keys, values, positions)  # in the cache's dtype (cache_dtype)
    return out.astype(q.dtype), pool_k, pool_v


def _kernel_local(pool_k, pool_v, table, q, k, v, positions, layer):
    """The kernel's layout on one device: pool_k, pool_v [K, L, P, block, H] (L = 1: one layer's pool)."""
    layer = 0 if layer is None else layer
    per_layer, block = pool_k.shape[2], pool_k.shape[3]
    at, offsets = _slots(table, positions, block)
    index = (slice(None), layer, at, offsets)  # -> [K, B, T, H]
    pool_k = pool_k.at[index].set(jnp.moveaxis(k, 2, 0).astype(pool_k.dtype))
    pool_v = pool_v.at[index].set(jnp.moveaxis(v, 2, 0).astype(pool_v.dtype))
    pages = table + layer * per_layer  # the layer's blocks in the pool seen as [K, L x P, block, H]
    keys, values = (pool.reshape(pool.shape[0], -1, block, pool.shape[-1]) for pool in (pool_k, pool_v))
    if q.shape[1] == 1:
        out = _paged_kernel(q, keys, values, positions[:, 0] + 1, pages)
        return out.astype(q.dtype), pool_k, pool_v
    b, m = table.shape  # a prompt chunk: each row's blocks gathered in table order
    keys = jnp.moveaxis(keys[:, pages], 0, 1).reshape(b, keys.shape[0], m * block, -1)  # [B, K, S, H]
    values = jnp.moveaxis(values[:, pages], 0, 1).reshape(b, values.shape[0], m * block, -1).swapaxes(2, 3)
    out = cached_attention(q.astype(keys.dtype), keys, values, positions)
    return out.astype(q.dtype), pool_k, pool_v


def _paged_kernel(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, pages: jax.Array):
    """q [B, 1, N, H] against the pool [K, P, block, H] through each row's pages [B, M] up to its length
    -> [B, 1, N, H] (one device's). Idle rows (length 0) attend to their first position, the scratch
    block, and are discarded by the caller. The kernel reads keys and values in bfloat16."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    block, width = keys.shape[2], pages.shape[1]
    per_step = max(d for d in range(1, width + 1) if width % d == 0 and d * block <= max(KERNEL_SPAN, block))
    q = (q[:, 0].astype(jnp.float32) * q.shape[-1] ** -0.5).astype(keys.dtype)  # the kernel does not scale
    interpret = target_device().platform == "cpu"
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        out = paged_attention(
            q, keys, values, jnp.maximum(lengths, 1).astype(jnp.int32), pages, pages_per_compute_block=per_step
        )
    return out[:, None]
