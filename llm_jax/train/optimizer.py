"""The optimizer: AdamW (decoupled weight decay) or Muon for the layers' matrices; linear warmup, then
cosine or warmup-stable-decay; global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import OptimConfig
from llm_jax.model.dense import IN_DIMS


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps; then cosine to lr * min_lr_ratio at total_steps, or (wsd) lr
    held until the last decay_fraction of the steps and decayed linearly to lr * min_lr_ratio."""
    end = o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
            decay_steps=max(total_steps, o.warmup_steps + 1), end_value=end,
        )  # fmt: skip
    decay = max(1, round(o.decay_fraction * total_steps))
    stable = max(0, total_steps - decay - o.warmup_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, o.lr, o.warmup_steps),
            optax.constant_schedule(o.lr),
            optax.linear_schedule(o.lr, end, decay),
        ],
        [o.warmup_steps, o.warmup_steps + stable],
    )


def decay_mask(params):
    """Weight decay on matrices (embedding, attention, MLP, head), never on RMSNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params
    )


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(o, total_steps)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    if o.name == "muon":
        adamw = optax.partition({"muon": _muon(o, schedule), "adamw": adamw}, _muon_labels)
    # Same state structure either way, so a run can resume with clipping switched on or off.
    clip = clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def _muon(o: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax's Muon on the layers' matrices, each [layers, *in, *out] orthogonalised per layer as the
    [in, out] matrix its matmul uses (model/dense.py IN_DIMS); consistent_rms=0.2 scales the update
    to AdamW's RMS, so optim.lr and weight_decay mean what they mean for AdamW (Liu et al. 2025)."""

    def dims(params):  # None: not a Muon parameter (the partition gives Muon the layers' matrices only)
        def spec(name, w):
            if name not in IN_DIMS:
                return None
            return optax.contrib.MuonDimensionNumbers(
                tuple(range(1, 1 + IN_DIMS[name])), tuple(range(1 + IN_DIMS[name], w.ndim))
            )

        return {k: {n: spec(n, w) for n, w in v.items()} if k == "layers" else None for k, v in params.items()}

    return optax.contrib.muon(
        schedule, weight_decay=o.weight_decay, muon_weight_dimension_numbers=dims, consistent_rms=0.2
    )


def _muon_labels(params):
    return {
        key: {n: "muon" if n in IN_DIMS else "adamw" for n in value} if key == "layers" else "adamw"
        for key, value in params.items()
    }


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's function as one multiplication by a scalar: optax's per-element
    select and division made XLA:CPU write the clipped gradients out before AdamW read them (a pass
    over every parameter: 20-28 ms a step for the benchmark's 29.9M); a multiplication it fuses into
    AdamW's own passes."""

    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(optax.tree.norm(updates), 1e-30))
        return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
