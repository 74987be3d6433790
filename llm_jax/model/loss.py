"""Cross-entropy of the LM head without materialising [tokens, vocab] logits.

Two schedules of the same function, picked by the platform the step is traced for:

- rows (accelerators): the rows are processed in chunks; each chunk's logits are computed, reduced to
  its loss and, in the same pass, to its gradients (softmax - onehot) @ table and its contribution to
  d(table). A custom VJP hands those back, so the backward pass does no second logits matmul and the
  logits chunk never leaves the cache: 3 x 2 x N x V x D FLOPs, one [chunk, vocab] float32 block.
  On a mesh, a chunk takes rows from every batch shard and its logits are split over vocab as the
  rules say (tensor parallelism: no device holds a full-vocab row), with the table's gradient
  accumulated in the table's own sharding.
- vocab tiles (CPU): the vocabulary is cut into tiles of a few thousand entries; a first pass over the
  tiles finds each row's log-sum-exp (a running max and sum) and keeps each tile's exps (in the
  compute dtype), a second turns a tile's exps into its gradients: d(hidden) accumulates in a
  [rows, D] carry and the table's gradient of a tile is written once. That is 3 logits-sized matmuls,
  as in `rows`, and the faster schedule on a CPU: no [vocab, D] float32 gradient is read and written
  again per chunk, and every matmul has the operand layout the CPU's bf16 kernels take (measured,
  2048 rows x 50304 x 384, fwd + bwd on 2 Xeon cores with AMX: bfloat16 358 ms against 1,251 ms for
  `rows`; float32 929 against 1,434).
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.device import from_bits, target_device, to_bits, transposed

# Bytes of one float32 logits chunk: on CPU about the L3 cache; on accelerators large enough to
# keep the matrix units busy while [N, vocab] (e.g. 1M x 128k for a pod step) would not fit.
CPU_CHUNK_BYTES, ACCELERATOR_CHUNK_BYTES = 32 << 20, 512 << 20
# The tiles schedule (CPU): a [rows, tile] float32 logits block of about TILE_BYTES per device, at most
# TILE_MAX_ROWS rows per pass. Measured at 2048 rows x 50304 (bfloat16, Xeon with AMX): 16 tiles of
# 3144 (25 MB) 385 ms, 32 of 1572 (13 MB) 385, 8 of 6288 421, 64 of 786 408.
TILE_BYTES, TILE_MAX_ROWS = 16 << 20, 4096
# The first pass keeps each tile's exps for the second instead of the second recomputing the logits:
# 3 matmuls instead of 4. At the benchmark shape: float32 929 against 1,037 ms (Xeon with AMX); bfloat16
# (exps kept in bfloat16: the gradient they make is rounded to bfloat16 anyway) 842 against 1,025 ms on
# an AMD Zen 4 (AVX-512 bf16), and level with recomputing on AMX (389 against 358 ms, within that host's
# noise). The kept exps of one pass, [rows, vocab] per device, stay under STORED_BYTES.
STORED_BYTES = 512 << 20


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


def tile_rows(n: int, max_rows: int = TILE_MAX_ROWS) -> int:
    """Rows per pass of the tiles schedule: on each device the largest divisor of its rows up to
    max_rows, times the batch shards."""
    shards = _shards_of(n)
    local = n // shards
    return shards * max(r for r in range(1, max(1, min(local, max_rows)) + 1) if local % r == 0)


def vocab_tile(local_rows: int, vocab: int) -> int:
    """Vocabulary entries per tile: a tile's float32 logits hold about TILE_BYTES per device (half to
    twice that), a multiple of 16 that divides the vocabulary where one does (50304 = 24 x 2096), else
    the last tile is padded (padding the table cost 30-45 ms a step at vocab 50304)."""
    tiles = max(1, math.ceil(local_rows * vocab * 4 / TILE_BYTES))
    exact = [n for n in range(max(1, tiles // 2), 2 * tiles + 1) if vocab % n == 0 and (vocab // n) % 16 == 0]
    if exact:
        return vocab // min(exact, key=lambda n: abs(n - tiles))
    return 16 * math.ceil(vocab / tiles / 16)


def _vocab_split() -> bool:
    """Whether the active rules split the vocabulary over mesh axes of more than one device."""
    return _logical_shards("vocab") > 1


def _shards_of(n: int) -> int:
    shards = batch_shards()
    return shards if n % shards == 0 else 1


def batch_shards() -> int:
    """How many shards the logical batch axis has on the active mesh and rules (1 outside a mesh)."""
    return _logical_shards("batch")


def _logical_shards(name: str) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((name,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def cross_entropy_sum(
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    dtype,
    chunk: int | None = None,
    schedule: str | None = None,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(sum_i weights[i] * (-log softmax(hidden[i] @ table.T)[targets[i]] + z_loss * lse_i^2), and the
    z-loss term of that sum, not differentiated), lse_i the log of row i's softmax normaliser (PaLM's
    z-loss; 0 leaves the cross-entropy).

    hidden [N, D], table [V, D] (the embedding, or an untied head in the same layout), targets [N]
    int, weights [N] float32. Matmuls take `dtype` inputs and accumulate in float32. `schedule`: "rows"
    | "tiles" (default: tiles on CPU unless the rules split the vocabulary, rows elsewhere); `chunk`
    (rows per chunk, dividing N) defaults to `chunk_rows` for rows and `tile_rows` for tiles.
    """
    if schedule is None:  # tiles split no vocabulary: where the rules split it (tensor parallelism), rows
        schedule = "tiles" if target_device().platform == "cpu" and not _vocab_split() else "rows"
    n, vocab = hidden.shape[0], table.shape[0]
    if schedule == "tiles":
        max_rows = min(TILE_MAX_ROWS, STORED_BYTES // (jnp.dtype(dtype).itemsize * vocab))
        rows = chunk or tile_rows(n, max_rows)
        tile = vocab_tile(rows // _shards_of(n), vocab)
        loss, z_sum = _ce_tiles(dtype, rows, tile, z_loss, hidden, table, targets, weights)
    else:
        loss, z_sum = _ce(dtype, chunk or chunk_rows(n, vocab), z_loss, hidden, table, targets, weights)
    return loss, jax.lax.stop_gradient(z_sum)  # the second output is for logs: its cotangent is dropped


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


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ce(dtype, chunk, z_loss, hidden, table, targets, weights):
    def body(totals, xs):
        h, t, w = xs
        logits = _chunk_logits(h, table, dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return totals + jnp.stack([jnp.sum((lse - _target_logit(logits, t)) * w), jnp.sum(lse**2 * w)]), None

    (nll, lse_sq), _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32), _chunks(chunk, hidden, targets, weights))
    return nll + z_loss * lse_sq, z_loss * lse_sq


def _ce_fwd(dtype, chunk, z_loss, hidden, table, targets, weights):
    def body(carry, xs):
        totals, d_table = carry
        h, t, w = xs
        logits = _chunk_logits(h, table, dtype)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        nll = lse[:, 0] - _target_logit(logits, t)
        p = jnp.exp(logits - lse) * (1 + 2 * z_loss * lse)  # d(lse + z lse^2) / d logits
        d_logits = (p - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)) * w[:, None]
        d_logits = nn.with_logical_constraint(d_logits.astype(dtype), ("batch", "vocab"))
        d_h = jnp.dot(d_logits, table.astype(dtype), preferred_element_type=jnp.float32)
        d_table = d_table + jnp.dot(d_logits.T, h.astype(dtype), preferred_element_type=jnp.float32)
        totals = totals + jnp.stack([jnp.sum(nll * w), jnp.sum(lse[:, 0] ** 2 * w)])
        return (totals, nn.with_logical_constraint(d_table, ("vocab", "embed"))), d_h

    init = (jnp.zeros(2, jnp.float32), jnp.zeros(table.shape, jnp.float32))
    ((nll, lse_sq), d_table), d_h = jax.lax.scan(body, init, _chunks(chunk, hidden, targets, weights))
    d_h = d_h.swapaxes(0, 1).reshape(hidden.shape)  # back to row order (see _chunks)
    return (nll + z_loss * lse_sq, z_loss * lse_sq), (d_h.astype(hidden.dtype), d_table.astype(table.dtype))


def _ce_bwd(dtype, chunk, z_loss, res, g):
    d_h, d_table = res
    g = g[0]  # the z-loss term's own output is not differentiated (cross_entropy_sum stops its gradient)
    return g * d_h, g * d_table, None, None  # targets and weights are data, not differentiated


_ce.defvjp(_ce_fwd, _ce_bwd)


# --- the tiles schedule (CPU) ---


def _ce_tiles_sums(dtype, rows, tile, z_loss, hidden, table, targets, weights):
    """(nll sum, sum of lse^2, d hidden, d table) by vocab tiles, `rows` rows per pass (see the module
    docstring); the gradients are those of nll + z_loss * lse^2."""
    vocab, d = table.shape
    tiles = math.ceil(vocab / tile)
    padded = table.astype(dtype)
    if tiles * tile > vocab:
        padded = jnp.pad(padded, ((0, tiles * tile - vocab), (0, 0)))
    blocks = to_bits(padded.reshape(tiles, tile, d))  # scanned over: see to_bits
    offsets = jnp.arange(tiles) * tile

    def tile_logits(h, block, offset):
        logits = jax.lax.dot_general(h, from_bits(block), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", None))
        if tiles * tile == vocab:
            return logits
        return jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + offset < vocab, logits, -jnp.inf)

    def one_pass(h, t, w):  # h [R, D] (dtype), t [R], w [R] -> sums [2], d h [R, D], d table^T by tile [T, D, tile]
        def lse_of_tile(carry, xs):  # a running max and sum of exp over the tiles
            high, total = carry
            logits = tile_logits(h, *xs)
            tile_high = jnp.max(logits, axis=1)
            exps = jnp.exp(logits - tile_high[:, None])
            new_high = jnp.maximum(high, tile_high)
            total = total * jnp.exp(high - new_high) + jnp.sum(exps, axis=1) * jnp.exp(tile_high - new_high)
            return (new_high, total), (to_bits(exps.astype(dtype)), tile_high)  # kept: see STORED_BYTES

        start = (jnp.full(t.shape, -jnp.inf, jnp.float32), jnp.zeros(t.shape, jnp.float32))
        (high, total), stored = jax.lax.scan(lse_of_tile, start, (blocks, offsets))
        lse = high + jnp.log(total)
        scale = w * (1 + 2 * z_loss * lse)  # d(lse + z lse^2) / d logits = softmax x (1 + 2 z lse)
        target_logit = jnp.sum(h.astype(jnp.float32) * padded[t].astype(jnp.float32), axis=1)
        h_t = transposed(h)  # [D, R]: d table^T = h^T @ d logits is then a plain [D, R] x [R, tile] matmul

        def grads_of_tile(d_h, xs):
            block, offset, exps, tile_high = xs  # softmax = the tile's exps x exp(tile max - lse)
            p = from_bits(exps).astype(jnp.float32) * (jnp.exp(tile_high - lse) * scale)[:, None]
            hit = jax.lax.broadcasted_iota(jnp.int32, p.shape, 1) + offset == t[:, None]
            d_logits = jnp.where(hit, p - w[:, None], p).astype(dtype)
            d_h = d_h + jnp.dot(d_logits, from_bits(block), preferred_element_type=jnp.float32)
            return d_h, jnp.dot(h_t, d_logits, preferred_element_type=jnp.float32)

        d_h, d_table_t = jax.lax.scan(grads_of_tile, jnp.zeros(h.shape, jnp.float32), (blocks, offsets, *stored))
        return jnp.stack([jnp.sum((lse - target_logit) * w), jnp.sum(lse**2 * w)]), d_h, d_table_t

    h = hidden.astype(dtype)
    if rows == h.shape[0]:
        sums, d_h, d_table_t = one_pass(h, targets, weights)
    else:

        def row_chunk(d_table_t, xs):
            sums, d_h, d_t = one_pass(*xs)
            return d_table_t + d_t, (sums, d_h)

        zeros = jnp.zeros((tiles, d, tile), jnp.float32)
        d_table_t, (sums, d_h) = jax.lax.scan(row_chunk, zeros, _chunks(rows, h, targets, weights))
        sums, d_h = jnp.sum(sums, axis=0), d_h.swapaxes(0, 1).reshape(h.shape)  # row order again (see _chunks)
    d_table = d_table_t.transpose(0, 2, 1).reshape(tiles * tile, d)
    if tiles * tile > vocab:
        d_table = d_table[:vocab]
    (nll, lse_sq) = sums
    return (nll + z_loss * lse_sq, z_loss * lse_sq), d_h.astype(hidden.dtype), d_table.astype(table.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ce_tiles(dtype, rows, tile, z_loss, hidden, table, targets, weights):
    return _ce_tiles_sums(dtype, rows, tile, z_loss, hidden, table, targets, weights)[0]


def _ce_tiles_fwd(dtype, rows, tile, z_loss, hidden, table, targets, weights):
    out, d_h, d_table = _ce_tiles_sums(dtype, rows, tile, z_loss, hidden, table, targets, weights)
    return out, (d_h, d_table)


def _ce_tiles_bwd(dtype, rows, tile, z_loss, res, g):
    d_h, d_table = res
    g = g[0]  # the z-loss term's own output is not differentiated (cross_entropy_sum stops its gradient)
    return g * d_h, g * d_table, None, None


_ce_tiles.defvjp(_ce_tiles_fwd, _ce_tiles_bwd)
