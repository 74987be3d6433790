"""Cross-entropy of the LM head without materialising [tokens, vocab] logits.

The rows are processed in chunks: each chunk's logits are computed, reduced to its loss and, in the
same pass, to its gradients (softmax - onehot) @ table and its contribution to d(table). A custom
VJP hands those back, so the backward pass does no second logits matmul (the usual trade of
chunked losses) and the logits chunk never leaves the cache. FLOPs are those of the plain head,
3 x 2 x N x V x D; memory is one [chunk, vocab] float32 block instead of [N, vocab].

On a mesh, a chunk takes rows from every batch shard and its logits are split over vocab as the
rules say (tensor parallelism: no device holds a full-vocab row), with the table's gradient
accumulated in the table's own sharding.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.device import target_device

# Bytes of one float32 logits chunk: on CPU about the L3 cache; on accelerators large enough to
# keep the matrix units busy while [N, vocab] (e.g. 1M x 128k for a pod step) would not fit.
CPU_CHUNK_BYTES, ACCELERATOR_CHUNK_BYTES = 32 << 20, 512 << 20


def chunk_rows(n: int, vocab: int, budget: int | None = None, shards: int | None = None) -> int:
    """Rows per chunk of n rows split over `shards` batch shards (default: the active mesh's): on
    each device, the largest power-of-two divisor of its n / shards rows whose logits chunk fits the
    budget (at least 8 rows), times the shards. The budget is per device: counted in global rows,
    a 128-chip llama-7b step ran 1,024 chunks of 32 rows, each gathering the whole LM head again
    (1.6 TB of all-reduces per chip and step in the compiled HLO, against 8 chunks now).
    The budget defaults to the one of the platform traced for."""
    if budget is None:
        budget = CPU_CHUNK_BYTES if target_device().platform == "cpu" else ACCELERATOR_CHUNK_BYTES
    shards = batch_shards() if shards is None else shards
    if n % shards:
        shards = 1
    rows, local = 1, n // shards
    while local % (rows * 2) == 0 and rows * 2 * vocab * 4 <= budget:
        rows *= 2
    return rows * shards if rows >= 8 else n


def batch_shards() -> int:
    """How many shards the logical batch axis has on the active mesh and rules (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def cross_entropy_sum(
    hidden: jax.Array, table: jax.Array, targets: jax.Array, weights: jax.Array, dtype, chunk: int | None = None
) -> jax.Array:
    """sum_i weights[i] * -log softmax(hidden[i] @ table.T)[targets[i]].

    hidden [N, D], table [V, D] (the embedding, or an untied head in the same layout), targets [N]
    int, weights [N] float32. Matmuls take `dtype` inputs and accumulate in float32. `chunk` (rows
    per chunk, dividing N) defaults to `chunk_rows`.
    """
    return _ce(dtype, chunk or chunk_rows(hidden.shape[0], table.shape[0]), hidden, table, targets, weights)


def token_log_probs(
    hidden: jax.Array, table: jax.Array, targets: jax.Array, dtype, chunk: int | None = None
) -> jax.Array:
    """log softmax(hidden[i] @ table.T)[targets[i]] for every row: [N] float32.

    Per-row outputs (DPO sums them per sequence) rule out the fused gradient of `_ce`, so this is
    plain autodiff through a scan whose chunks are rematerialised: the backward pass recomputes
    each chunk's logits (one more head matmul) and memory stays at one [chunk, vocab] block.
    """
    chunk = chunk or chunk_rows(hidden.shape[0], table.shape[0])

    @jax.checkpoint
    def body(_, xs):
        h, t = xs
        logits = _chunk_logits(h, table, dtype)
        return None, _target_logit(logits, t) - jax.nn.logsumexp(logits, axis=-1)

    _, out = jax.lax.scan(body, None, _chunks(chunk, hidden, targets))
    return out.swapaxes(0, 1).reshape(-1)  # back to row order (see _chunks)


def _chunks(chunk, *arrays):
    """[N, ...] -> [N / chunk, chunk, ...], chunk c holding rows c, c + N / chunk, ...: the rows are
    split over batch shards in contiguous blocks, so every chunk keeps all shards busy."""
    out = [a.reshape(chunk, a.shape[0] // chunk, *a.shape[1:]).swapaxes(0, 1) for a in arrays]
    return [nn.with_logical_constraint(a, (None, "batch") + (None,) * (a.ndim - 2)) for a in out]


def _chunk_logits(h, table, dtype):
    logits = jnp.dot(h.astype(dtype), table.astype(dtype).T, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "vocab"))


def _target_logit(logits, t):
    """logits[i, t[i]] as a masked sum: partitions over a vocab-split axis, where a gather would not."""
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]
    return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ce(dtype, chunk, hidden, table, targets, weights):
    def body(total, xs):
        h, t, w = xs
        logits = _chunk_logits(h, table, dtype)
        nll = jax.nn.logsumexp(logits, axis=-1) - _target_logit(logits, t)
        return total + jnp.sum(nll * w), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunks(chunk, hidden, targets, weights))
    return total


def _ce_fwd(dtype, chunk, hidden, table, targets, weights):
    def body(carry, xs):
        total, d_table = carry
        h, t, w = xs
        logits = _chunk_logits(h, table, dtype)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        nll = lse[:, 0] - _target_logit(logits, t)
        d_logits = (jnp.exp(logits - lse) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)) * w[:, None]
        d_logits = nn.with_logical_constraint(d_logits.astype(dtype), ("batch", "vocab"))
        d_h = jnp.dot(d_logits, table.astype(dtype), preferred_element_type=jnp.float32)
        d_table = d_table + jnp.dot(d_logits.T, h.astype(dtype), preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * w), nn.with_logical_constraint(d_table, ("vocab", "embed"))), d_h

    init = (jnp.zeros((), jnp.float32), jnp.zeros(table.shape, jnp.float32))
    (total, d_table), d_h = jax.lax.scan(body, init, _chunks(chunk, hidden, targets, weights))
    d_h = d_h.swapaxes(0, 1).reshape(hidden.shape)  # back to row order (see _chunks)
    return total, (d_h.astype(hidden.dtype), d_table.astype(table.dtype))


def _ce_bwd(dtype, chunk, res, g):
    d_h, d_table = res
    return g * d_h, g * d_table, None, None  # targets and weights are data, not differentiated


_ce.defvjp(_ce_fwd, _ce_bwd)
