"""The jitted train and eval steps over the mesh, and the sharded train state they carry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from llm_jax import sharding
from llm_jax.train import objectives
from llm_jax.config import Config, ModelConfig
from llm_jax.model.transformer import Transformer


class TrainState(struct.PyTreeNode):
    step: jax.Array       # [] int32: optimizer steps taken
    params: Any           # float32 pytree, sharded by the logical axis rules
    opt_state: Any        # AdamW moments, sharded like params
    rng: jax.Array        # [] key: dropout noise is fold_in(rng, step, micro-batch)
    ref_params: Any = None  # dpo.reference=in_step: the frozen starting parameters, sharded like params


@dataclass
class Steps:
    """Everything compiled for one (config, layout): init, one optimizer step, one eval batch.

    Calls run under the layout's mesh and rules; `compile_train()` gives the compiled step itself
    (memory_analysis(), cost_analysis(), as_text()) without running it.
    """
    layout: sharding.Layout
    state_sharding: Any
    abstract_state: TrainState
    abstract_batch: dict
    jit_init: Callable
    jit_train: Callable
    jit_eval: Callable

    def init(self, rng: jax.Array) -> TrainState:
        with self.layout.activate():
            return self.jit_init(rng)

    def train(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with self.layout.activate():
            return self.jit_train(state, batch)

    def eval(self, params, batch: dict) -> dict:
        with self.layout.activate():
            return self.jit_eval(params, batch)

    def compile_train(self):
        with self.layout.activate():
            return self.jit_train.lower(self.abstract_state, self.abstract_batch).compile()


def make_steps(cfg: Config, layout: sharding.Layout, tx: optax.GradientTransformation,
               token_bytes: np.ndarray | None = None, example: dict | None = None) -> Steps:
    """`example` is one row of the training data ({name: array}); default: a pretraining window."""
    pipeline = (cfg.mesh.pipeline, cfg.mesh.pipeline_microbatches)
    train_model, eval_model = Transformer(cfg.model, True, pipeline), Transformer(cfg.model, False, pipeline)
    sums, count = objectives.objective(cfg, train_model, eval_model)
    in_step_reference = cfg.train.objective == "dpo" and cfg.dpo.reference == "in_step"
    accum = cfg.train.grad_accum
    if example is None:
        example = {"tokens": np.zeros(cfg.model.seq_len + 1, np.int32)}

    def init(rng):
        dummy = jnp.zeros((1, cfg.model.seq_len), jnp.int32)
        params = eval_model.init(jax.random.fold_in(rng, 0), dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.fold_in(rng, 1), ref_params=params if in_step_reference else None)

    with layout.activate():
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sharding = layout.tree_shardings(boxed)
    abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), state_sharding)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # micro-batch a takes rows a, a + A, ... of every array (an even split per device)
        micro = {k: jax.lax.with_sharding_constraint(
                     v.reshape(v.shape[0] // accum, accum, *v.shape[1:]).swapaxes(0, 1),
                     layout.sharding((None, "batch") + (None,) * (v.ndim - 1))) for k, v in batch.items()}
        step_rng = jax.random.fold_in(state.rng, state.step)

        def micro_loss(params, mb, i):
            rng = jax.random.fold_in(step_rng, i) if cfg.model.dropout else None
            return sums(params, mb, rng, state.ref_params)

        def accumulate(grads, xs):
            mb, i = xs
            (loss, aux), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params, mb, i)
            return jax.tree_util.tree_map(jnp.add, grads, g), (loss, aux)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, (losses, aux) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
        n = count(batch)
        grads = jax.tree_util.tree_map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.sum(losses) / n, "grad_norm": optax.tree.norm(grads)}
        metrics |= {k: jnp.sum(v) / n for k, v in aux.items()}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    bytes_table = jnp.asarray(token_bytes if token_bytes is not None else np.ones(cfg.model.vocab_size), jnp.float32)

    def eval_step(params, batch: dict) -> dict:
        """Sums over the batch. Language models: weighted nll (nats), target tokens and the UTF-8
        bytes they stand for; dpo: the loss and metrics summed over the real pairs, and their number."""
        if cfg.train.objective == "dpo":
            loss, aux = objectives.dpo_sums(eval_model, eval_model, cfg.dpo, params, batch)
            return {"loss": loss, "pairs": jnp.sum(objectives.pair_mask(batch))} | aux
        w = batch["weights"]
        return {"nll": objectives.lm_sums(eval_model, params, batch)[0], "tokens": jnp.sum(w),
                "bytes": jnp.sum(bytes_table[batch["tokens"][:, 1:]] * w)}

    batch_sharding = {k: layout.sharding(("batch",) + (None,) * v.ndim) for k, v in example.items()}
    replicated = layout.replicated()
    jit_init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_sharding)
    jit_train = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                        out_shardings=(state_sharding, replicated), donate_argnums=0)
    # eval batches arrive placed by Layout.put_batch (batch-split), which jit takes as they are
    jit_eval = jax.jit(eval_step, in_shardings=(state_sharding.params, None), out_shardings=replicated)

    abstract_batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape), v.dtype, sharding=batch_sharding[k])
                      for k, v in example.items()}
    return Steps(layout, state_sharding, abstract_state, abstract_batch, jit_init, jit_train, jit_eval)


def pair_scorer(cfg: ModelConfig, layout: sharding.Layout) -> Callable:
    """(params, {tokens [B, 2, L+1], weights [B, 2, L]}) -> summed response log-probs [B, 2], on
    every device: the reference scores of DPO pairs. Call under layout.activate()."""
    model = Transformer(cfg)
    return jax.jit(lambda p, b: objectives.sequence_logps(model, p, b["tokens"], b["weights"]),
                   out_shardings=layout.replicated())


def abstract_params(cfg: ModelConfig, layout: sharding.Layout):
    """Shapes, dtypes and mesh shardings of the parameters, without allocating them."""
    model = Transformer(cfg)
    with layout.activate():
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32)))
    shardings = layout.tree_shardings(boxed["params"])
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.meta.unbox(boxed["params"]), shardings)


def eval_metrics(sums: dict) -> dict:
    """Summed eval outputs -> loss (nats/token), perplexity, bits per byte; dpo: means per pair."""
    if "pairs" in sums:
        return {k: v / sums["pairs"] for k, v in sums.items() if k != "pairs"}
    loss = sums["nll"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": sums["nll"] / math.log(2) / sums["bytes"]}
