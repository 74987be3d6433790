"""A decoder-only transformer (the Llama recipe) in Flax linen.

tokens -> embedding -> n_layers x [RMSNorm -> causal attention (RoPE, GQA) -> +residual,
RMSNorm -> SwiGLU MLP -> +residual] (model/block.py) -> RMSNorm -> LM head (tied to the embedding or not).

Parameters are float32; matmuls take `cfg.dtype` inputs and accumulate in float32
(`preferred_element_type`), the fast path on bf16 hardware and exact on f32. Every parameter and
key activation names its axes (embed, heads, kv_heads, head_dim, mlp, vocab, batch, length,
layers); llm_jax/parallel/sharding.py maps those names onto the device mesh. Layers are one `nn.scan`, so
compile time does not grow with depth (a serving model on CPU unrolls them: `serving`). A KV cache
(llm_jax/model/kv_cache.py, contiguous, or kv_pages.py, paged) is an explicit pytree in and out of `__call__`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.block import REMAT_POLICIES, Block, BlockGroup, rms_norm, rope_tables, scanned_blocks
from llm_jax.model.context_parallel import balance, context_shards, unbalance
from llm_jax.model.dense import param
from llm_jax.model.device import compute_dtype, cpu_rows, on_cpu
from llm_jax.model.kv_cache import Cache
from llm_jax.model.loss import cross_entropy_sum, token_log_probs
from llm_jax.model.pipeline import run_pipeline

# a circular pipeline's layers (Transformer._pipelined) never save the weights of the tick's round
_ROUND_REMAT = REMAT_POLICIES | {"none": jax.checkpoint_policies.save_anything_except_these_names("round_weights")}


def _round(weights: jax.Array) -> jax.Array:
    return jax.ad_checkpoint.checkpoint_name(weights, "round_weights")


class Transformer(nn.Module):
    cfg: ModelConfig
    train: bool = False  # enables dropout (needs a "dropout" rng)
    # (stages, micro-batches, repeats): > 1 stage runs the layers as a GPipe (1 repeat) or circular schedule,
    # its `layers` parameters in stage order (model/pipeline.py)
    pipeline: tuple[int, int, int] = (1, 1, 1)
    # Serving on CPU: the layers are n_layers separate modules, their parameters layer_0, layer_1, ...
    # (unstack_layers), run one after the other. Scanned, each decode step copied every layer's weights
    # out of the stacked ones (the demo model's decode step at batch 16 in bfloat16: 6.6 -> 3.2 ms).
    # Compile time grows with depth: serving only, and only where it pays (CPU).
    serving: bool = False

    def setup(self):
        cfg = self.cfg
        if self.unstacked:
            block = lambda i: Block(cfg, self.train, moe=cfg.is_moe(i), name=f"layer_{i}")  # noqa: E731
            self.blocks = [block(i) for i in range(cfg.n_layers)]
        else:
            self.layers = scanned_blocks(cfg, self.train, name="layers")
        self.embedding = param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.final_norm = param(self, "final_norm", (cfg.d_model,), ("embed",), None)
        if not cfg.tie_embeddings:
            # [vocab, embed] like the embedding (and like Hugging Face's lm_head.weight)
            self.lm_head = param(self, "lm_head", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        segments: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """tokens [B, T] -> final hidden states [B, T, D] (normed), and the updated cache.

        Without a cache, positions default to 0..T-1. With one, the T tokens are written at
        cache_index (a scalar, or [B]: one per row) and positions default to cache_index + 0..T-1;
        a paged cache is written at `positions` (required; < 0: padding).
        segments [B, T] (packed examples, training only): attention stays within a segment and
        positions restart at each.
        """
        cfg, dt = self.cfg, compute_dtype(self.cfg.dtype)
        if positions is None and segments is not None:
            positions = segment_positions(segments)
        if positions is None:
            positions = jnp.broadcast_to(
                jnp.asarray(cache_index)[..., None] + jnp.arange(tokens.shape[1]), tokens.shape
            )
        # The lookup gathers rows from a table replicated for the occasion: a gather from a table
        # split over vocab and embed makes XLA's partitioner replicate anyway, with a warning.
        table = nn.with_logical_constraint(self.embedding, (None, None))
        x = jnp.take(table, tokens, axis=0).astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cfg.dropout:
            x = nn.Dropout(cfg.dropout, deterministic=not self.train)(x)
        context = context_shards()[1] if cache is None and not self.is_initializing() else 1
        if context > 1:  # one early and one late chunk per device (model/context_parallel.py)
            x, positions = balance(x, context), balance(positions, context)
            segments = None if segments is None else balance(segments, context)
        if self.pipeline[0] > 1 and cache is None and not self.is_initializing():
            x, stats = self._pipelined(x, positions, segments)
            if stats is not None:
                self.sow("intermediates", "moe", stats)
        else:
            rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            end = cache_index + tokens.shape[1] if cache is not None and isinstance(cache_index, int) else None
            if self.unstacked:  # each layer with its own cache (init_cache per_layer)
                caches = []
                for i, block in enumerate(self.blocks):
                    (x, mine, _), _ = block((x, cache and cache[i], None), rope, positions, cache_index, segments, end)
                    caches.append(mine)
                cache = cache and caches
            else:
                carry = (x, cache, jnp.zeros((), jnp.int32))
                (x, cache, _), stats = self.layers(carry, rope, positions, cache_index, segments, end)
                if stats is not None:  # [units, ...] per MoE layer: lm_sums collects them (mutable intermediates)
                    self.sow("intermediates", "moe", stats)
        if context > 1:
            x = nn.with_logical_constraint(unbalance(x, context), ("batch", "length", "embed"))
        return rms_norm(x, self.final_norm, cfg.norm_eps), cache

    @property
    def unstacked(self) -> bool:
        return self.serving and on_cpu()

    def _pipelined(self, x, positions, segments) -> tuple[jax.Array, dict | None]:
        """The layer stack as S stages of R chunks of K units (layer_unit) (llm_jax/model/pipeline.py) -> x, and
        an MoE model's router statistics per unit (each micro-batch's, averaged; expert loads summed)."""
        cfg, (stages, microbatches, repeats) = self.cfg, self.pipeline
        # one unit (standalone), given the weights of each round: a layer, or a BlockGroup (model.moe.every)
        if cfg.moe.experts and cfg.moe.every > 1:  # remat around the whole unit below, not again inside it
            block = BlockGroup(dataclasses.replace(cfg, remat="none"), self.train, parent=None)
        else:
            block = Block(cfg, self.train, moe=cfg.moe.experts > 0, parent=None)
        rng = self.make_rng("dropout") if self.train and cfg.dropout else None

        def layer(h, weights, r, rope, pos, seg, key):  # weights: one layer's, every round [R, ...]
            if repeats == 1:
                chosen = jax.tree_util.tree_map(lambda w: w[0], weights)
            else:
                chosen = jax.tree_util.tree_map(lambda w: _round(jax.lax.dynamic_index_in_dim(w, r, 0, False)), weights)
            rngs = {"dropout": key} if key is not None else None
            (h, _, _), stats = block.apply({"params": chosen}, (h, None, None), rope, pos, 0, seg, rngs=rngs)
            return h, stats

        # a round's weights are picked inside the remat, so the backward picks them again: saved, they
        # would be a copy of the stage's weights per tick (model.remat=none keeps everything else)
        if repeats > 1:
            layer = jax.checkpoint(layer, policy=_ROUND_REMAT[cfg.remat], prevent_cse=False)
        elif cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)

        def run_stage(params, r, h, pos, seg, key):  # params [K, R, ...]: h [b, T, D] through round r's K units
            rope = rope_tables(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

            def step(h, xs):
                weights, k = xs
                return layer(h, weights, r, rope, pos, seg, None if key is None else jax.random.fold_in(key, k))

            n = jax.tree_util.tree_leaves(params)[0].shape[0]
            return jax.lax.scan(step, h, (params, jnp.arange(n)))  # h, and the K units' statistics or None

        layers = nn.meta.unbox(self.layers.variables["params"])  # plain arrays: each layer is applied alone
        x, stats = run_pipeline(run_stage, layers, x, positions, segments, stages, microbatches, repeats, rng)
        # expert loads are counts (summed over the micro-batches), the rest each micro-batch's mean
        return x, stats and {k: v if k == "load" else v / microbatches for k, v in stats.items()}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, vocab] float32 (generation; training uses `nll_sum`)."""
        dt = compute_dtype(self.cfg.dtype)
        table = self.embedding if self.cfg.tie_embeddings else self.lm_head
        # a 2-D dot contracting both last axes: XLA:CPU runs it ~1.8x faster than the 3-D einsum
        # (16 x 256 by 8192 x 256: 0.30 vs 0.56 ms), which matters once per decoded token
        rows = hidden.reshape(-1, hidden.shape[-1]).astype(dt)
        out = jax.lax.dot_general(
            cpu_rows(rows), table.astype(dt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        out = out[: rows.shape[0]]
        return nn.with_logical_constraint(out.reshape(*hidden.shape[:-1], -1), ("batch", "length", "vocab"))

    def nll_sum(
        self, hidden: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0
    ) -> tuple[jax.Array, jax.Array]:
        """sum of weights * (-log p(targets) + z_loss * log(Z)^2) and its z-loss part (not differentiated):
        hidden [B, T, D], targets [B, T], weights [B, T] -> [], [] float32 (model/loss.py)."""
        table = self.embedding if self.cfg.tie_embeddings else self.lm_head
        return cross_entropy_sum(
            hidden.reshape(-1, hidden.shape[-1]),
            table,
            targets.reshape(-1),
            weights.reshape(-1),
            compute_dtype(self.cfg.dtype),
            z_loss=z_loss,
        )

    def token_logps(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
        """log p(targets) per token: hidden [B, T, D], targets [B, T] -> [B, T] float32 (DPO)."""
        table = self.embedding if self.cfg.tie_embeddings else self.lm_head
        logps = token_log_probs(
            hidden.reshape(-1, hidden.shape[-1]), table, targets.reshape(-1), compute_dtype(self.cfg.dtype)
        )
        return logps.reshape(targets.shape)


def segment_positions(segments: jax.Array) -> jax.Array:
    """segments [B, T] -> each token's offset from the start of its segment [B, T]."""
    index = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def unstack_layers(params: dict) -> dict:
    """A serving model's parameters on CPU (Transformer.serving): the stacked `layers` [n_layers, ...]
    as layer_0, layer_1, ... Elsewhere they stay as they are."""
    if not on_cpu() or "layers" not in params:
        return params
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]

    def layer(x, i):  # split over a mesh as the stacked weight was, less its layers axis
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.device_put(x[i], jax.sharding.NamedSharding(sharding.mesh, jax.P(*sharding.spec[1:])))
        return x[i]

    if all(name.startswith("block_") for name in stacked):  # BlockGroups of model.moe.every layers
        every = len(stacked)
        return {k: v for k, v in params.items() if k != "layers"} | {
            f"layer_{g * every + j}": jax.tree_util.tree_map(lambda x, g=g: layer(x, g), stacked[f"block_{j}"])
            for g in range(n)
            for j in range(every)
        }
    per_layer = {f"layer_{i}": jax.tree_util.tree_map(lambda x, i=i: layer(x, i), stacked) for i in range(n)}
    return {k: v for k, v in params.items() if k != "layers"} | per_layer


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters a token passes (LM head included; of an MoE layer the
    router and its top_k + shared experts) + 12 x layers x d x seq_len for the attention scores and values
    (the PaLM appendix formula; XLA computes the full T x T square)."""
    d, layers, moe = cfg.d_model, cfg.n_layers, cfg.moe
    moe_layers = sum(cfg.is_moe(i) for i in range(layers))
    mlp = (layers - moe_layers) * 3 * d * cfg.mlp_dim
    routers = d * (moe.experts + moe.shared_gate)  # the router, and the shared experts' gate
    mlp += moe_layers * (3 * d * cfg.expert_dim * (moe.top_k + moe.shared_experts) + routers)
    matmul_params = layers * d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + mlp + d * cfg.vocab_size
    return 6 * matmul_params + 12 * layers * cfg.n_heads * cfg.head_dim * cfg.seq_len
