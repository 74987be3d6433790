"""Context (sequence) parallelism: attention over a sequence split along the mesh's `context` axis.

Every rules preset maps the logical axis `length` to mesh.context, so with mesh.context = C > 1
each device holds T / C tokens of every row in every activation; only attention needs tokens of
other devices, and it runs per device inside jax.shard_map, in one of two forms
(model.context_parallel):

- all_gather: keys, values (and segment ids) are gathered whole along the axis; the local queries
  attend to them. Simple, one collective per layer, but every device holds the whole K/V.
- ring: keys and values travel around the axis with ppermute, C - 1 hops; each device combines the
  blocks it sees with an online softmax (flash attention's running max and sum): the forward holds
  two K/V blocks at a time (the backward keeps each hop's as residuals, C blocks: the whole K/V, as
  all_gather holds it). Blocks that the causal mask hides are not computed.

Load balance: a causal mask gives late tokens more work than early ones, so the sequence is cut
into 2C chunks and device i holds chunks i and 2C-1-i (the "zigzag" order: every device then has
one early and one late chunk). The model reorders its activations once before the layers and
back after them (`balance` / `unbalance`); inside, masks use each token's original index. In the
ring form each hop then costs every device the same: half a block pair (either all its queries
against the first of the visiting chunks, or its late chunk against both), the diagonal hop a
causal block pair. Positions (RoPE) and segment ids travel with their tokens, so packed
documents and the loss are unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config.rules import as_tuple

# Queries per score block (each block's scores recomputed in the backward): the tiny model's step at
# seq 4096 on 2 devices, temporary MiB per device, all_gather 1,060 with whole 2,048-query blocks and
# 868 with 512; the ring 558 and 567 (its peak is elsewhere).
QUERY_BLOCK = 512


def context_shards() -> tuple[tuple[str, ...], int]:
    """The mesh axes `length` is split over under the active mesh and rules, and their total size."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = as_tuple(nn.logical_to_mesh_axes(("length",))[0])
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return axes, size


def balance(x: jax.Array, shards: int) -> jax.Array:
    """[B, T, ...] in token order -> the zigzag order: shard i holds chunks i and 2C-1-i."""
    b, t = x.shape[:2]
    halves = x.reshape(b, 2, shards, t // (2 * shards), *x.shape[2:])
    early, late = halves[:, 0], jnp.flip(halves[:, 1], axis=1)  # [B, C, T/2C, ...] each
    return jnp.stack([early, late], axis=2).reshape(x.shape)


def unbalance(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of `balance`."""
    b, t = x.shape[:2]
    pairs = x.reshape(b, shards, 2, t // (2 * shards), *x.shape[2:])
    return jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1).reshape(x.shape)


def attention_specs() -> tuple[jax.sharding.PartitionSpec, ...]:
    """The active rules' specs of attention's q [B, T, N, H], k and v [B, T, K, H] and segments [B, T]:
    how a per-device attention (shard_map) sees its inputs."""
    spec = lambda *names: jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(names))  # noqa: E731
    kv_spec = spec("batch", "length", "kv_heads", "head_dim")
    return spec("batch", "length", "heads", "head_dim"), kv_spec, kv_spec, spec("batch", "length")


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None, form: str) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] (in the balanced order, split over the context axis) -> [B, T, N, H]."""
    axes, shards = context_shards()
    if segments is None:
        segments = jnp.zeros(q.shape[:2], jnp.int32)

    def local(q, k, v, segments):
        shard = jax.lax.axis_index(axes)
        if form == "all_gather":
            return _gathered(q, k, v, segments, axes, shard, shards)
        return _ring(q, k, v, segments, axes, shard, shards)

    specs = attention_specs()
    return jax.shard_map(local, in_specs=specs, out_specs=specs[0], check_vma=False)(q, k, v, segments)


def _token_index(shard, shards: int, local_len: int) -> jax.Array:
    """[2L] original positions of a shard's tokens in the balanced order."""
    half = local_len // 2
    r = jnp.arange(local_len)
    chunk = jnp.where(r < half, shard, 2 * shards - 1 - shard)
    return chunk * half + r % half


def _attend(q, k, v, visible):
    """q [b, t, N, H], k/v [b, s, K, H], visible [b, t, s] -> (out [b, t, N, H] float32, normalised;
    log-sum-exp [b, K, G, t], -inf where a query sees nothing), QUERY_BLOCK queries at a time."""
    parts = [
        _attend_block(q[:, i : i + QUERY_BLOCK], k, v, visible[:, i : i + QUERY_BLOCK])
        for i in range(0, q.shape[1], QUERY_BLOCK)
    ]
    return jnp.concatenate([o for o, _ in parts], axis=1), jnp.concatenate([lse for _, lse in parts], axis=-1)


@jax.checkpoint  # the backward recomputes a block's scores rather than keeping them for every hop
def _attend_block(q, k, v, visible):
    b, t, n, h = q.shape
    kv = k.shape[2]
    qq = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qq, k, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    high = jnp.max(scores, axis=-1, keepdims=True)
    high = jax.lax.stop_gradient(jnp.where(jnp.isfinite(high), high, 0.0))  # the result does not depend on it
    p = jnp.exp(scores - high)
    total = jnp.sum(p, axis=-1)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / safe.transpose(0, 3, 1, 2)[..., None]
    lse = jnp.where(total > 0, high[..., 0] + jnp.log(safe), -jnp.inf)
    return out.reshape(b, t, n, h), lse


def _merge(a, b):
    """Two partial attentions over disjoint keys -> their union (a's log-sum-exp is finite)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    weight = lambda part: jnp.exp(part - lse).transpose(0, 3, 1, 2).reshape(*out_a.shape[:3], 1)  # noqa: E731
    return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def _gathered(q, k, v, segments, axes, shard, shards: int):
    local_len = q.shape[1]
    gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # noqa: E731
    keys_index = jnp.concatenate([_token_index(s, shards, local_len) for s in range(shards)])
    q_index = _token_index(shard, shards, local_len)
    k_segments = gather(segments)
    visible = (keys_index[None, None, :] <= q_index[None, :, None]) & (segments[:, :, None] == k_segments[:, None, :])
    return _attend(q, gather(k), gather(v), visible)[0].astype(q.dtype)


def _ring(q, k, v, segments, axes, shard, shards: int):
    local_len = q.shape[1]
    half = local_len // 2
    index = _token_index(shard, shards, local_len)
    causal = index[None, None, :] <= index[None, :, None]
    acc = _attend(q, k, v, causal & (segments[:, :, None] == segments[:, None, :]))  # the diagonal block pair
    perm = [(s, (s + 1) % shards) for s in range(shards)]
    kv_seg = (k, v, segments)
    for hop in range(1, shards):
        kv_seg = jax.lax.ppermute(kv_seg, axes, perm)  # now the blocks of shard (shard - hop) mod C
        source = (shard - hop) % shards

        def early_keys(kv_seg):  # source < shard: every local query sees the source's early chunk, not its late
            k2, v2, s2 = kv_seg
            return _attend(q, k2[:, :half], v2[:, :half], segments[:, :, None] == s2[:, None, :half])

        def late_queries(kv_seg):  # source > shard: only the local late chunk sees the source, all of it
            k2, v2, s2 = kv_seg
            out, lse = _attend(q[:, half:], k2, v2, segments[:, half:, None] == s2[:, None, :])
            out = jnp.concatenate([jnp.zeros_like(out), out], axis=1)
            return out, jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=-1)

        acc = _merge(acc, jax.lax.cond(source < shard, early_keys, late_queries, kv_seg))
    return acc[0].astype(q.dtype)
