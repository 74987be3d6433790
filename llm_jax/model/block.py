"""One transformer layer (model/transformer.py stacks them): RMSNorm -> causal attention (RoPE, GQA) ->
+residual, RMSNorm -> SwiGLU MLP (or routed experts, model/moe.py) -> +residual; and the layer scan.

Every parameter and key activation names its axes (embed, heads, kv_heads, head_dim, mlp, experts);
llm_jax/parallel/sharding.py maps those names onto the device mesh.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.attention import causal_attention
from llm_jax.model.context_parallel import context_attention, context_shards
from llm_jax.model.dense import dense, param
from llm_jax.model.device import compute_dtype, on_cpu
from llm_jax.model.kv_cache import write_and_attend
from llm_jax.model.kv_pages import paged_kernel, paged_write_and_attend
from llm_jax.model.moe import moe_mlp

# dots: keep the matmul outputs (and, on CPU in bfloat16, the transposed matmul inputs that the weight
# gradients take: model/dense.py) and the blocked attention's output and log-sum-exp; recompute the rest
SAVED_BY_DOTS = ("matmul_out", "matmul_input_t", "attention_out", "attention_lse")
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.save_only_these_names(*SAVED_BY_DOTS)}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple[float, ...] = ()) -> jax.Array:
    """[head_dim / 2] float32 rotation frequencies. scaling [factor, low_freq_factor, high_freq_factor,
    original_context] (Llama 3.1): wavelengths longer than original_context / low_freq_factor are
    stretched by factor, those shorter than original_context / high_freq_factor kept, and the band
    between interpolated, so a model trained at 8K reads 128K positions."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if not scaling:
        return inv_freq
    factor, low, high, context = scaling
    wavelength = 2 * math.pi / inv_freq
    smooth = jnp.clip((context / wavelength - low) / (high - low), 0.0, 1.0)  # 0: stretched, 1: kept
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, scaling: tuple[float, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, 1, head_dim / 2] (float32)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, N, H] by position; the two halves of H are the pair (the HF Llama layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Block(nn.Module):
    """One pre-norm transformer layer; scanned, so its signature is (carry, *per-layer inputs)."""

    cfg: ModelConfig
    train: bool = False
    moe: bool = False  # the MLP is routed over experts (model/moe.py)

    @nn.compact
    def __call__(self, carry, rope, positions, cache_index, segments, end=None):
        """carry: (x [B, T, D], cache, layer) -> (the next carry, the MoE router's statistics or None).
        The cache is None (training), the whole stacked cache with this layer's index (scanned layers: the
        cache travels in the carry and is written in place; as the scan's per-layer output it was copied
        whole at every decode step), or this layer's own cache with layer None (unstacked serving layers).
        end: how many cache slots are written once this chunk is, where known when tracing (a Python int:
        a prefill from a fixed position, e.g. generate's from 0), else None; a static argument of the
        remat below, so it stays an int inside the layer scan as well."""
        x, cache, layer = carry
        cfg, dt = self.cfg, compute_dtype(self.cfg.dtype)
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        # Attention: [B, T, D] -> q [B, T, N, H], k/v [B, T, K, H] -> [B, T, D]
        y = rms_norm(x, param(self, "attn_norm", (d,), ("embed",), None), cfg.norm_eps)
        q = dense(self, "wq", y, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, 1)
        kk = dense(self, "wk", y, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, 1)
        v = dense(self, "wv", y, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, 1)
        if cfg.qkv_bias:  # Qwen2's projections; zero-initialised, no weight decay
            q = q + param(self, "q_bias", (n, h), ("heads", "head_dim"), 0.0).astype(dt)
            kk = kk + param(self, "k_bias", (k, h), ("kv_heads", "head_dim"), 0.0).astype(dt)
            v = v + param(self, "v_bias", (k, h), ("kv_heads", "head_dim"), 0.0).astype(dt)
        if cfg.qk_norm:  # Qwen3: every query and key head RMS-normed over head_dim (one scale shared by the heads)
            q = rms_norm(q, param(self, "q_norm", (h,), ("head_dim",), None), cfg.norm_eps)
            kk = rms_norm(kk, param(self, "k_norm", (h,), ("head_dim",), None), cfg.norm_eps)
        q = nn.with_logical_constraint(apply_rope(q, *rope), ("batch", "length", "heads", "head_dim"))
        kk = nn.with_logical_constraint(apply_rope(kk, *rope), ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None and context_shards()[1] > 1 and not self.is_initializing():
            attn = context_attention(q, kk, v, segments, cfg.context_parallel)  # the sequence split over devices
        elif cache is None:  # at init under a context mesh: any kernel that takes the shapes (xla)
            attn = causal_attention(q, kk, v, "xla" if context_shards()[1] > 1 else cfg.attention, segments)
        else:  # decode: write this chunk into the cache, attend to every cached position <= own
            if "table" in cache:  # a paged pool (continuous batching)
                attn, cache = paged_write_and_attend(cache, layer, q, kk, v, positions, paged_kernel(cfg))
            else:
                attn, cache = write_and_attend(cache, layer, q, kk, v, positions, cache_index, end)
            attn = attn.astype(dt)
        x = x + self._dropout(dense(self, "wo", attn, (n, h, d), ("heads", "head_dim", "embed"), out_std, 2))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        # MLP: [B, T, D] -> SwiGLU [B, T, F] -> [B, T, D], or routed over experts (model/moe.py)
        y = rms_norm(x, param(self, "mlp_norm", (d,), ("embed",), None), cfg.norm_eps)
        stats = None
        if self.moe:
            out, stats = moe_mlp(self, y, out_std)
            if cfg.moe.shared_experts:
                shared = self._swiglu(y, "shared_", cfg.moe.shared_experts * cfg.expert_dim, out_std)
                if cfg.moe.shared_gate:  # Qwen1.5/2-MoE: a learned sigmoid gate per token
                    w = param(self, "shared_router", (d,), ("embed",), cfg.init_std)
                    gate = jax.nn.sigmoid(jnp.einsum("btd,d->bt", y.astype(jnp.float32), w))
                    shared = shared * gate[..., None].astype(shared.dtype)
                out = out + shared
        else:
            out = self._swiglu(y, "w_", cfg.mlp_dim, out_std)
        x = x + self._dropout(out)
        return (
            nn.with_logical_constraint(x, ("batch", "length", "embed")),
            cache,
            None if layer is None else layer + 1,
        ), stats

    def _swiglu(self, y: jax.Array, prefix: str, width: int, out_std: float) -> jax.Array:
        """[B, T, D] -> [B, T, D] through the weights {prefix}gate, {prefix}up [D, width], {prefix}down [width, D]."""
        cfg, dt, d = self.cfg, compute_dtype(self.cfg.dtype), self.cfg.d_model
        gate = dense(self, f"{prefix}gate", y, (d, width), ("embed", "mlp"), cfg.init_std, 1)
        up = dense(self, f"{prefix}up", y, (d, width), ("embed", "mlp"), cfg.init_std, 1)
        # on CPU in float32, rounded once: XLA:CPU rounds every bfloat16 intermediate, 6 roundings here
        # (TPUs keep the fused op's intermediates in float32 anyway; as float32 operands there, its
        # backward's saved inputs grew llama-7b's train step on v5p-256 from 22.5 to 26.3 GiB)
        act = jnp.float32 if on_cpu() else dt
        hidden = (jax.nn.silu(gate.astype(act)) * up.astype(act)).astype(dt)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(self, f"{prefix}down", hidden, (width, d), ("mlp", "embed"), out_std, 1)

    def _dropout(self, x):
        return nn.Dropout(self.cfg.dropout, deterministic=not self.train)(x) if self.cfg.dropout else x


class BlockGroup(nn.Module):
    """model.moe.every = n > 1: n layers, dense but for the last (MoE): the unit the layer scan repeats."""

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, carry, *inputs):
        n = self.cfg.moe.every
        for i in range(n):
            carry, stats = remat_block(self.cfg)(self.cfg, self.train, moe=i == n - 1, name=f"block_{i}")(
                carry, *inputs
            )
        return carry, stats


def layer_unit(cfg: ModelConfig) -> tuple[type[nn.Module], dict]:
    """The repeated unit of the layer stack and its extra fields: a Block, or a BlockGroup of model.moe.every
    layers (MoE every n-th layer)."""
    if cfg.moe.experts and cfg.moe.every > 1:
        return BlockGroup, {}
    return remat_block(cfg), {"moe": cfg.moe.experts > 0}


def units(cfg: ModelConfig) -> int:
    """How many units (layer_unit) the n_layers make."""
    return cfg.n_layers // (cfg.moe.every if cfg.moe.experts else 1)


def remat_block(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return Block
    # static_argnums counts self: Block's `end` is its 6th argument
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False, static_argnums=(6,))


def scanned_blocks(cfg: ModelConfig, train: bool, **kwargs) -> nn.Module:
    """The layer units (layer_unit) as one nn.scan (params stacked on a leading `layers` axis), remat as configured."""
    unit, fields = layer_unit(cfg)
    return nn.scan(
        unit,
        length=units(cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 5,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, train, **fields, **kwargs)
