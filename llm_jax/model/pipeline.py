"""Pipeline parallelism: the layer stack cut into S stages, run as a GPipe or circular schedule.

The stack is cut into S x R chunks of K = n_layers / (S R) layers. With R = 1 repeat (GPipe) stage s
holds chunk s; with R > 1 (circular, also called interleaved) stage s holds chunks s, s + S, ...,
s + (R - 1) S, and every micro-batch goes round the stages R times. The rules map the `layers` axis
to the `pipeline` mesh axis, so the scanned parameters [n_layers, ...], viewed as [S, K, R, ...],
already live on their stage's devices: the state keeps them in *stage order* (`to_stage_order`: the
identity for R = 1), checkpoints in layer order (`to_layer_order` at save, `to_stage_order` after a
restore: one all-to-all each), so a run resumes across S, R and unpipelined. The batch is cut into
M >= S micro-batches, and time advances in ticks:

    tick t:  stage 0 takes micro-batch t mod M: fresh for t < M, else what the last stage made of it
             one round earlier (kept in a buffer of M outputs); stage s > 0 takes what stage s - 1
             produced at tick t - 1 (a shift of the [S, ...] state along the stage axis: one
             collective permute between neighbours); then all stages run at once (vmap over the
             sharded stage axis, so each device group computes only its own stage), stage s with
             its chunk of round (t - s) // M.

After R M + S - 1 ticks every micro-batch has been through all S R chunks. The backward pass is the
scan's transpose. In the S - 1 fill and S - 1 drain ticks some stages work on padding whose results
are discarded: the bubble, (S - 1) / (R M + S - 1) of the time. More micro-batches shrink it at the
cost of smaller matmuls; more repeats at the cost of R times the stage-to-stage transfers (the saved
activations stay the same: R M + S - 1 ticks of K layers instead of M + S - 1 of R K).

Micro-batch m holds rows m, m + M, m + 2M, ... of the batch, so each batch shard (data x fsdp)
keeps an equal share of every micro-batch and nothing moves between batch shards: the rows
train.grad_accum = M gives each accumulation step. An MoE model's units also return router statistics;
the pipeline sums each unit's over the micro-batches it ran on (padding ticks excluded), so its balance
loss is per micro-batch, as it is with train.grad_accum = M.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

StageFn = Callable[..., tuple[jax.Array, dict | None]]
# (stage params: leaves [K, R, ...], round r [], h [b, T, D], positions [b, T], segments [b, T] | None, rng)
#   -> h [b, T, D]: the stage's K units of round r (chunk r S + s) on one micro-batch, and their statistics
#   (leaves [K, ...]) or None


def run_pipeline(
    stage_fn: StageFn,
    layer_params,
    x: jax.Array,
    positions: jax.Array,
    segments: jax.Array | None,
    stages: int,
    microbatches: int,
    repeats: int = 1,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict | None]:
    """x [B, T, D] through all units -> [B, T, D], and the units' statistics summed over the micro-batches
    (leaves [units, ...] in layer order) or None; layer_params: leaves [units, ...] in stage order."""
    S, M, R, B = stages, microbatches, repeats, x.shape[0]
    stage_axis = nn.logical_to_mesh_axes(("layers",))[0]  # the mesh axis the rules put the stages on

    def on_stages(a):  # [n_layers, ...] -> [S, K, R, ...], stage axis pinned, the rest as it was
        a = a.reshape(S, a.shape[0] // (S * R), R, *a.shape[1:])
        return jax.lax.with_sharding_constraint(a, P(stage_axis, *[P.UNCONSTRAINED] * (a.ndim - 1)))

    def split(a):  # [B, ...] -> [M, B / M, ...]: micro-batch m = rows m, m + M, ...
        return a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)

    params = jax.tree_util.tree_map(on_stages, layer_params)
    has_segments, has_rng = segments is not None, rng is not None
    fresh = [split(x), split(positions), split(segments if has_segments else positions)]
    state = [jnp.zeros((S, *c.shape[1:]), c.dtype) for c in fresh]
    micro = (None, "batch", "length", "embed")  # [M, b, T, D]: each micro-batch split like the batch
    done = nn.with_logical_constraint(jnp.zeros_like(fresh[0]), micro)  # each micro-batch's last output

    def run(p, r, h, pos, seg, key):
        return stage_fn(p, r, h, pos, seg if has_segments else None, key if has_rng else None)

    run_stages = jax.vmap(run, spmd_axis_name=stage_axis)
    first = (jnp.arange(S) == 0).reshape(S, 1, 1)
    keys0 = jax.random.split(rng, S) if has_rng else jnp.zeros((S,), jnp.uint32)
    shapes = jax.eval_shape(run_stages, params, jnp.zeros(S, jnp.int32), *(s[:1].repeat(S, 0) for s in fresh), keys0)
    totals = jax.tree_util.tree_map(lambda a: jnp.zeros((S, a.shape[1], R, *a.shape[2:]), a.dtype), shapes[1])

    def tick(carry, t):
        state, done, totals = carry
        m = t % M
        incoming = [jnp.where(t < M, fresh[0][m], done[m]), fresh[1][m], fresh[2][m]]
        # stage 0 takes micro-batch m; stage s > 0 what stage s - 1 produced last tick
        shifted = [
            jnp.where(first if s.ndim == 3 else first[..., None], n[None], jnp.roll(s, 1, axis=0))
            for s, n in zip(state, incoming)
        ]
        h = nn.with_logical_constraint(shifted[0], ("layers", "batch", "length", "embed"))
        keys = jax.random.split(jax.random.fold_in(rng, t), S) if has_rng else jnp.zeros((S,), jnp.uint32)
        rounds = jnp.clip((t - jnp.arange(S)) // M, 0, R - 1)
        out, stats = run_stages(params, rounds, h, shifted[1], shifted[2], keys)
        out = nn.with_logical_constraint(out, ("layers", "batch", "length", "embed"))
        # stage s ran a real micro-batch (not fill or drain padding) where 0 <= t - s < R M: add to its round's
        real = (t >= jnp.arange(S)) & (t - jnp.arange(S) < R * M)
        slot = jax.nn.one_hot(rounds, R) * real[:, None]  # [S, R]
        totals = jax.tree_util.tree_map(
            lambda a, x: a + slot.reshape(S, 1, R, *[1] * (x.ndim - 2)) * x[:, :, None], totals, stats
        )
        # the last stage's output is micro-batch t - S + 1's (before tick S - 1: padding, overwritten later)
        last = nn.with_logical_constraint(out[S - 1], micro[1:])
        done = jax.lax.dynamic_update_index_in_dim(done, last, (t - S + 1) % M, 0)
        done = nn.with_logical_constraint(done, micro)
        return ([out, *shifted[1:]], done, totals), None

    (_, done, totals), _ = jax.lax.scan(tick, (state, done, totals), jnp.arange(R * M + S - 1))
    # [S, K, R, ...] -> [R, S, K, ...]: chunk r S + s holds units (r S + s) K + k
    totals = jax.tree_util.tree_map(lambda a: a.transpose(2, 0, 1, *range(3, a.ndim)).reshape(-1, *a.shape[3:]), totals)
    return done.swapaxes(0, 1).reshape(B, *done.shape[2:]), totals  # [M, B / M, T, D] -> [B, T, D]


def _permute_layers(tree, view: tuple[int, int, int], axes: tuple[int, int, int], repeats: int):
    """Every leaf under a `layers` key (the parameters, and the optimizer moments that mirror them) with
    its first axis viewed as `view` and transposed by `axes`; the rest as it is. A reshape and a
    transpose, which XLA moves between stages as one all-to-all (not a gather of every layer)."""

    def leaf(path, x):
        if not any(getattr(k, "key", None) == "layers" for k in path):
            return x
        moved = x.reshape(*view, *x.shape[1:]).transpose(*axes, *range(3, x.ndim + 2))
        return moved.reshape(x.shape)

    return tree if repeats == 1 else jax.tree_util.tree_map_with_path(leaf, tree)


def to_stage_order(tree, stages: int, repeats: int):
    """Layer order (checkpoints, unpipelined models) -> stage order (a circular pipeline's state): the
    stack viewed as [R, S, K] (chunk r S + s runs in round r on stage s) becomes [S, K, R], so each
    stage's layers are together and its scan over K layers carries every round of a layer."""
    return _permute_layers(tree, (repeats, stages, -1), (1, 2, 0), repeats)


def to_layer_order(tree, stages: int, repeats: int):
    """Stage order -> layer order: the inverse of to_stage_order."""
    return _permute_layers(tree, (stages, -1, repeats), (2, 0, 1), repeats)
