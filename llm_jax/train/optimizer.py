"""The optimizer: AdamW (decoupled weight decay) or Muon for the layers' matrices; linear warmup, then
cosine or warmup-stable-decay; global-norm clipping."""

from __future__ import annotations

import math

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
    decay = min(max(1, round(o.decay_fraction * total_steps)), max(1, total_steps - o.warmup_steps))
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
    """Weight decay on matrices (embedding, attention, MLP, head), never on RMSNorm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in str(getattr(k, "key", k)) for k in path for s in ("norm", "bias")), params
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
    """optax's Muon direction (Nesterov momentum orthogonalised by Newton-Schulz) for the layers'
    matrices, each [layers, *in, *out] orthogonalised per layer as the [in, out] matrix its matmul uses
    (model/dense.py IN_DIMS), scaled to an RMS of 0.2 x sqrt(max(fan in, fan out)) (Liu et al. 2025:
    the RMS of AdamW's updates, so optim.lr and weight_decay mean what they mean for AdamW)."""

    def dims(updates):  # the partition masks all but the layers' matrices (optax MaskedNode: passed through)
        def spec(name, w):
            in_dims = IN_DIMS[name]
            return optax.contrib.MuonDimensionNumbers(
                tuple(range(1, 1 + in_dims)), tuple(range(1 + in_dims, getattr(w, "value", w).ndim))
            )

        return _on_matrices(spec, updates)

    def rms_like_adamw(updates, state, params=None):
        def scale(name, u):
            fan_in = math.prod(u.shape[1 : 1 + IN_DIMS[name]])
            return u * (0.2 * math.sqrt(max(fan_in, u[0].size // fan_in)))

        return _on_matrices(scale, updates), state

    return optax.chain(
        optax.contrib.scale_by_muon(weight_dimension_numbers=dims),
        optax.GradientTransformation(lambda params: optax.EmptyState(), rms_like_adamw),
        optax.add_decayed_weights(o.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


def _on_matrices(fn, tree):
    """fn(name, leaf) on the layers' matrices; the rest of the tree (masked out) as it is."""
    layers = {name: fn(name, w) if name in IN_DIMS else w for name, w in tree["layers"].items()}
    return {key: layers if key == "layers" else value for key, value in tree.items()}


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
