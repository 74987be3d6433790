"""The jitted train and eval steps over the mesh, and the sharded train state they carry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from llm_jax.config import Config
from llm_jax.model import pipeline
from llm_jax.model.attention import prebuild_splash
from llm_jax.model.moe import update_router_bias
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import Layout
from llm_jax.train.objectives import objective_of


class TrainState(struct.PyTreeNode):
    step: jax.Array  # [] int32: optimizer steps taken
    params: Any  # float32 pytree, sharded by the logical axis rules
    opt_state: Any  # AdamW moments, sharded like params
    rng: jax.Array  # [] key: dropout noise is fold_in(rng, step, micro-batch)
    ref_params: Any = None  # dpo.reference=in_step: the frozen starting parameters, sharded like params


@dataclass
class Steps:
    """Everything compiled for one (config, layout): init, one optimizer step, one eval batch.

    Calls run under the layout's mesh and rules; `compile_train()` gives the compiled step itself
    (memory_analysis(), cost_analysis(), as_text()) without running it. A circular pipeline's state
    keeps its layers in stage order (model/pipeline.py): `to_layer_order` before a checkpoint is
    written or the parameters leave the step, `to_stage_order` after one is read.
    """

    layout: Layout
    state_sharding: Any
    abstract_state: TrainState
    abstract_batch: dict
    jit_init: Callable
    jit_train: Callable
    jit_eval: Callable
    pipeline: tuple[int, int]  # (stages, repeats)
    _reorders: dict = field(default_factory=dict)

    def init(self, rng: jax.Array) -> TrainState:
        with self.layout.activate():
            return self.jit_init(rng)

    def train(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with self.layout.activate():
            return self.jit_train(state, batch)

    def eval(self, params, batch: dict) -> dict:
        with self.layout.activate():
            return self.jit_eval(params, batch)

    def to_stage_order(self, tree):
        """A TrainState or its params from layer order (checkpoints) to this step's; the input is donated."""
        return self._reorder(tree, pipeline.to_stage_order)

    def to_layer_order(self, tree):
        """The inverse of to_stage_order (the input is donated); both return `tree` itself without repeats."""
        return self._reorder(tree, pipeline.to_layer_order)

    def _reorder(self, tree, reorder: Callable):
        if self.pipeline[1] == 1:
            return tree
        whole = isinstance(tree, TrainState)
        if (reorder, whole) not in self._reorders:
            sharding = self.state_sharding if whole else self.state_sharding.params
            self._reorders[reorder, whole] = jax.jit(
                lambda t: reorder(t, *self.pipeline), in_shardings=(sharding,), out_shardings=sharding, donate_argnums=0
            )
        with self.layout.activate():
            return self._reorders[reorder, whole](tree)

    def compile_train(self):
        with self.layout.activate():
            return self.jit_train.lower(self.abstract_state, self.abstract_batch).compile()


def make_steps(
    cfg: Config,
    layout: Layout,
    tx: optax.GradientTransformation,
    token_bytes: np.ndarray | None = None,
    example: dict | None = None,
) -> Steps:
    """`example` is one row of the training data ({name: array}); default: a pretraining window."""
    stages, repeats = cfg.mesh.pipeline, cfg.mesh.pipeline_repeats
    schedule = (stages, cfg.mesh.pipeline_microbatches, repeats)
    train_model, eval_model = Transformer(cfg.model, True, schedule), Transformer(cfg.model, False, schedule)
    objective = objective_of(cfg)
    sums, count = objective.train_sums(cfg, train_model, eval_model)
    in_step_reference = objective.in_step_reference(cfg)
    accum = cfg.train.grad_accum
    if example is None:
        example = {"tokens": np.zeros(cfg.model.seq_len + 1, np.int32)}

    def init(rng):
        dummy = jnp.zeros((1, cfg.model.seq_len), jnp.int32)
        params = eval_model.init(jax.random.fold_in(rng, 0), dummy)["params"]  # layers in layer order
        params = pipeline.to_stage_order(params, stages, repeats)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.fold_in(rng, 1),
            ref_params=params if in_step_reference else None,
        )

    if layout.mesh.devices.flat[0].platform == "tpu":
        prebuild_splash(cfg.model)  # outside the mesh: under one of abstract chips no array can be made
    with layout.activate():
        boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))  # abstract: no array on any device
    state_sharding = layout.tree_shardings(boxed)
    abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), state_sharding
    )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # micro-batch a takes rows a, a + A, ... of every array (an even split per device)
        micro = {
            k: jax.lax.with_sharding_constraint(
                v.reshape(v.shape[0] // accum, accum, *v.shape[1:]).swapaxes(0, 1),
                layout.sharding((None, "batch") + (None,) * (v.ndim - 1)),
            )
            for k, v in batch.items()
        }
        step_rng = jax.random.fold_in(state.rng, state.step)
        n = count(batch)

        def micro_loss(params, mb, i):  # divided by the whole batch's count here, the gradients need no pass
            rng = jax.random.fold_in(step_rng, i) if cfg.model.dropout else None
            loss, aux = sums(params, mb, rng, state.ref_params)
            return loss / n, aux

        def accumulate(grads, xs):
            mb, i = xs
            (loss, aux), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params, mb, i)
            return jax.tree_util.tree_map(jnp.add, grads, g), (loss, aux)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, (losses, aux) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if "moe_load" in aux:  # model.moe.bias_update: the routers' biases follow the step's expert loads
            params = update_router_bias(cfg.model, params, jnp.sum(aux.pop("moe_load"), axis=0))
        metrics = {"loss": jnp.sum(losses), "grad_norm": optax.tree.norm(grads)}
        metrics |= {k: jnp.sum(v) / n for k, v in aux.items()}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    bytes_table = jnp.asarray(token_bytes if token_bytes is not None else np.ones(cfg.model.vocab_size), jnp.float32)
    eval_step = objective.eval_sums(cfg, eval_model, bytes_table)  # sums over the batch

    batch_sharding = {k: layout.sharding(("batch",) + (None,) * v.ndim) for k, v in example.items()}
    replicated = layout.replicated()
    jit_init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_sharding)
    jit_train = jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    # eval batches arrive placed by Layout.put_batch (batch-split), which jit takes as they are
    jit_eval = jax.jit(eval_step, in_shardings=(state_sharding.params, None), out_shardings=replicated)

    abstract_batch = {
        k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape), v.dtype, sharding=batch_sharding[k])
        for k, v in example.items()
    }
    return Steps(
        layout, state_sharding, abstract_state, abstract_batch, jit_init, jit_train, jit_eval, (stages, repeats)
    )
