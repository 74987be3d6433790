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
from llm_jax.config import Config, ModelConfig
from llm_jax.model.transformer import Transformer


class TrainState(struct.PyTreeNode):
    step: jax.Array       # [] int32: optimizer steps taken
    params: Any           # float32 pytree, sharded by the logical axis rules
    opt_state: Any        # AdamW moments, sharded like params
    rng: jax.Array        # [] key: dropout noise is fold_in(rng, step, micro-batch)


def nll_sum(model: Transformer, params, tokens: jax.Array, weights: jax.Array | None = None,
            rng: jax.Array | None = None) -> jax.Array:
    """tokens [B, L+1] -> sum over the L targets tokens[:, 1:] of weights * -log p(target | prefix)."""
    rngs = {"dropout": rng} if rng is not None else None
    hidden, _ = model.apply({"params": params}, tokens[:, :-1], rngs=rngs)
    if weights is None:
        weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    return model.apply({"params": params}, hidden, tokens[:, 1:], weights, method=Transformer.nll_sum)


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
               token_bytes: np.ndarray | None = None) -> Steps:
    train_model, eval_model = Transformer(cfg.model, train=True), Transformer(cfg.model)
    accum = cfg.train.grad_accum
    micro_sharding = layout.sharding((None, "batch", None))

    def init(rng):
        dummy = jnp.zeros((1, cfg.model.seq_len), jnp.int32)
        params = eval_model.init(jax.random.fold_in(rng, 0), dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.fold_in(rng, 1))

    with layout.activate():
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sharding = layout.tree_shardings(boxed)
    abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), state_sharding)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens = batch["tokens"]  # [B, L+1]; micro-batch a takes rows a, a + A, ... (an even split per device)
        micro = tokens.reshape(tokens.shape[0] // accum, accum, -1).swapaxes(0, 1)
        micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
        step_rng = jax.random.fold_in(state.rng, state.step)

        def micro_loss(params, mb, i):
            rng = jax.random.fold_in(step_rng, i) if cfg.model.dropout else None
            return nll_sum(train_model, params, mb, rng=rng)

        def accumulate(grads, xs):
            mb, i = xs
            loss, g = jax.value_and_grad(micro_loss)(state.params, mb, i)
            return jax.tree_util.tree_map(jnp.add, grads, g), loss

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
        n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        grads = jax.tree_util.tree_map(lambda g: g / n_tokens, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.sum(losses) / n_tokens, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    bytes_table = jnp.asarray(token_bytes if token_bytes is not None else np.ones(cfg.model.vocab_size), jnp.float32)

    def eval_step(params, batch: dict) -> dict:
        """Sums over the batch: weighted nll (nats), target tokens and the UTF-8 bytes they stand for."""
        w = batch["weights"]
        return {"nll": nll_sum(eval_model, params, batch["tokens"], w), "tokens": jnp.sum(w),
                "bytes": jnp.sum(bytes_table[batch["tokens"][:, 1:]] * w)}

    data_sharding = layout.sharding(("batch", None))
    batch_sharding = {"tokens": data_sharding}
    replicated = layout.replicated()
    jit_init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_sharding)
    jit_train = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                        out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_batch_sharding = {"tokens": data_sharding, "weights": data_sharding}
    jit_eval = jax.jit(eval_step, in_shardings=(state_sharding.params, eval_batch_sharding),
                       out_shardings=replicated)

    abstract_batch = {"tokens": jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                                     sharding=data_sharding)}
    return Steps(layout, state_sharding, abstract_state, abstract_batch, jit_init, jit_train, jit_eval)


def abstract_params(cfg: ModelConfig, layout: sharding.Layout):
    """Shapes, dtypes and mesh shardings of the parameters, without allocating them."""
    model = Transformer(cfg)
    with layout.activate():
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32)))
    shardings = layout.tree_shardings(boxed["params"])
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.meta.unbox(boxed["params"]), shardings)


def eval_metrics(sums: dict) -> dict:
    """Summed eval outputs -> loss (nats/token), perplexity, bits per byte."""
    loss = sums["nll"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": sums["nll"] / math.log(2) / sums["bytes"]}
