"""Pipeline parallelism: the layer stack cut into S stages, run as a GPipe schedule.

The scanned layer parameters [n_layers, ...] are viewed as [S, n_layers / S, ...]; the rules map
the `layers` axis to the `pipeline` mesh axis, so stage s's layers already live on the devices at
position s of that axis (the view is free, and checkpoints keep the [n_layers, ...] layout whatever
the stage count). The batch is cut into M micro-batches, and time advances in ticks:

    tick t:  stage 0 takes micro-batch t; stage s > 0 takes what stage s - 1 produced at tick t - 1
             (a shift of the [S, ...] state along the stage axis: one collective permute between
             neighbouring stages); all stages then run at once (vmap over the stage axis, which is
             sharded, so each device group computes only its own stage).

After M + S - 1 ticks every micro-batch has left the last stage. The backward pass is the scan's
transpose: all forward ticks, then all backward ticks (GPipe). In the S - 1 fill and S - 1 drain
ticks some stages work on padding whose results are discarded, so a step costs (M + S - 1) / M of
the pipelined work: the bubble, (S - 1) / (M + S - 1) of the time. More micro-batches shrink it;
each costs a smaller matmul and one more set of saved stage inputs.

Micro-batch m holds rows m, m + M, m + 2M, ... of the batch, so each batch shard (data x fsdp)
keeps an equal share of every micro-batch and nothing moves between batch shards.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

StageFn = Callable[..., jax.Array]  # (stage params, h [b, T, D], positions [b, T], segments [b, T] | None, rng) -> h


def gpipe(
    stage_fn: StageFn,
    layer_params,
    x: jax.Array,
    positions: jax.Array,
    segments: jax.Array | None,
    stages: int,
    microbatches: int,
    rng: jax.Array | None = None,
) -> jax.Array:
    """x [B, T, D] through all layers -> [B, T, D]; layer_params: leaves [n_layers, ...]."""
    S, M, B = stages, microbatches, x.shape[0]
    stage_axis = nn.logical_to_mesh_axes(("layers",))[0]  # the mesh axis the rules put the stages on

    def on_stages(a):  # [n_layers, ...] -> [S, n_layers / S, ...], stage axis pinned, the rest as it was
        a = a.reshape(S, a.shape[0] // S, *a.shape[1:])
        return jax.lax.with_sharding_constraint(a, P(stage_axis, *[P.UNCONSTRAINED] * (a.ndim - 1)))

    def split(a):  # [B, ...] -> [M, B / M, ...]: micro-batch m = rows m, m + M, ...
        return a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)

    params = jax.tree_util.tree_map(on_stages, layer_params)
    has_segments, has_rng = segments is not None, rng is not None
    carried = [split(x), split(positions), split(segments if has_segments else positions)]
    # the feed: the M micro-batches, then S - 1 ticks of padding while the pipeline drains
    feed = [jnp.concatenate([c, jnp.zeros((S - 1, *c.shape[1:]), c.dtype)]) for c in carried]
    state = [jnp.zeros((S, *c.shape[1:]), c.dtype) for c in carried]

    def run(p, h, pos, seg, key):
        return stage_fn(p, h, pos, seg if has_segments else None, key if has_rng else None)

    run_stages = jax.vmap(run, spmd_axis_name=stage_axis)
    first = (jnp.arange(S) == 0).reshape(S, 1, 1)

    def tick(state, inputs):
        t, new = inputs
        # stage 0 takes the next micro-batch; stage s > 0 what stage s - 1 produced last tick
        shifted = [
            jnp.where(first if s.ndim == 3 else first[..., None], n[None], jnp.roll(s, 1, axis=0))
            for s, n in zip(state, new)
        ]
        h = nn.with_logical_constraint(shifted[0], ("layers", "batch", "length", "embed"))
        keys = jax.random.split(jax.random.fold_in(rng, t), S) if has_rng else jnp.zeros((S,), jnp.uint32)
        out = run_stages(params, h, shifted[1], shifted[2], keys)
        out = nn.with_logical_constraint(out, ("layers", "batch", "length", "embed"))
        return [out, *shifted[1:]], out[S - 1]

    _, outs = jax.lax.scan(tick, state, (jnp.arange(M + S - 1), feed))
    y = outs[S - 1 :]  # [M, B / M, T, D]: micro-batch m leaves the last stage at tick m + S - 1
    return y.swapaxes(0, 1).reshape(B, *y.shape[2:])
