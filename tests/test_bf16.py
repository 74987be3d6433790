"""bfloat16 compute done right: every matmul of a train step (backward included) takes bfloat16 inputs
and accumulates in float32, its gradients follow float32's, and model.dtype=auto says what it picked.
(How fast XLA runs those matmuls is measured by benchmarks/train_throughput.py, not here.)"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_generals, tiny_config

from llm_jax.config import load_config
from llm_jax.model.dense import matmul
from llm_jax.model.device import auto_dtype, compute_dtype, cpu_info, transposed
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import make_layout
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps


def test_every_matmul_of_a_bf16_train_step_takes_bf16_and_accumulates_in_f32():
    """Forward, backward (autodiff took the float32 cotangent of the accumulator: float32 x bfloat16
    matmuls) and the LM head's loss, on packed rows (the attention's segment mask)."""
    cfg = load_config("tiny", ["model.dtype=bfloat16"])
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    tokens = np.zeros(cfg.model.seq_len + 1, np.int32)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10), example={"tokens": tokens, "segments": tokens})
    with layout.activate():
        jaxpr = jax.make_jaxpr(steps.jit_train)(steps.abstract_state, steps.abstract_batch)
    dots = collections.Counter(
        (tuple(str(v.aval.dtype) for v in e.invars), str(e.params["preferred_element_type"]))
        for e in dot_generals(jaxpr.jaxpr)
    )
    # the layer scan's body: 7 projections x 3 matmuls, the attention's, and the tiled LM head's 4
    assert sum(dots.values()) >= 7 * 3 + 4 + 4
    assert set(dots) == {(("bfloat16", "bfloat16"), "float32")}


def test_a_transposed_bf16_operand_is_copied_and_its_matmul_contracts_the_last_axis():
    """XLA:CPU folds a plain x.T into the matmul that reads it (contracting both operands' leading axes, a
    layout its bf16 kernels run at half speed); device.transposed keeps the transpose a copy."""
    x, g = jnp.arange(64 * 48, dtype=jnp.bfloat16).reshape(64, 48), jnp.ones((64, 32), jnp.bfloat16)

    def contracted(f):
        hlo = jax.jit(f).lower(x, g).compile().as_text()
        return {line.split("lhs_contracting_dims=")[1][:3] for line in hlo.splitlines() if " dot(" in line}

    assert contracted(lambda x, g: jnp.dot(x.T, g, preferred_element_type=jnp.float32)) == {"{0}"}
    assert contracted(lambda x, g: jnp.dot(transposed(x), g, preferred_element_type=jnp.float32)) == {"{1}"}
    assert jnp.array_equal(transposed(x), x.T)


def test_matmul_gradients_in_bf16_follow_float32():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (64, 48))
    w = jax.random.normal(keys[1], (48, 32)) / 7
    g = jax.random.normal(keys[2], (64, 32))

    def grads(dtype):
        return jax.grad(lambda x, w: jnp.sum(matmul(x.astype(dtype), w, 1, dtype).astype(jnp.float32) * g), (0, 1))(
            x, w
        )

    (dx16, dw16), (dx32, dw32) = grads(jnp.bfloat16), grads(jnp.float32)
    assert dx16.dtype == jnp.float32 and dw16.dtype == jnp.float32  # the cast back to the inputs' dtypes
    for a, b in ((dx16, dx32), (dw16, dw32)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-2  # bf16 inputs: ~2^-9 per product


def test_a_bf16_model_gives_float32_gradients_within_bf16_precision():
    cfg = load_config("tiny", ["model.dtype=bfloat16"]).model
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    params = Transformer(cfg).init(jax.random.PRNGKey(0), tokens[:, :-1])["params"]

    def grads(dtype):
        model = Transformer(cfg.__class__(**{**cfg.__dict__, "dtype": dtype}))

        def loss(p):
            hidden, _ = model.apply({"params": p}, tokens[:, :-1])
            return model.apply({"params": p}, hidden, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape), method="nll_sum")[0]

        return jax.jit(jax.grad(loss))(params)

    bf16, f32 = grads("bfloat16"), grads("float32")
    for path, a in jax.tree_util.tree_flatten_with_path(bf16)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(f32)[0])[path]
        assert a.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.05, jax.tree_util.keystr(path)


def test_serving_casts_the_weight_matrices_once_and_keeps_the_norm_scales_float32():
    from llm_jax.model.dense import inference_params

    cfg = tiny_config("x", "model.dtype=bfloat16").model
    params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    dtypes = {
        jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(inference_params(cfg, params))
    }
    norms = {k: d for k, d in dtypes.items() if "norm" in k}
    assert len(norms) == 3 and set(norms.values()) == {jnp.dtype(jnp.float32)}
    assert {d for k, d in dtypes.items() if k not in norms} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "platform, flags, want",
    [
        ("tpu", [], "bfloat16"),
        ("gpu", [], "bfloat16"),
        ("cpu", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "bfloat16"),  # Sapphire Rapids and later
        ("cpu", ["avx2", "avx512f", "avx512_bf16"], "bfloat16"),  # AMD Zen 4: bf16 dot products, no matrix units
        ("cpu", ["avx2", "avx512f"], "float32"),  # Skylake-X, Ice Lake
        ("cpu", ["avx2"], "float32"),
    ],
)
def test_auto_picks_bf16_where_the_hardware_has_fast_bf16_matmuls(platform, flags, want):
    dtype, why = auto_dtype(platform, flags)
    assert dtype == want and why
    assert compute_dtype("float32", platform) == jnp.float32 and compute_dtype("bfloat16", platform) == jnp.bfloat16


def test_auto_on_this_machine_and_the_run_log_says_so(prepared_run, corpus_slice):
    from llm_jax.train.loop import train

    want = "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(cpu_info()["flags"]) else "float32"
    assert compute_dtype("auto") == jnp.dtype(want)
    lines = []
    cfg = tiny_config(prepared_run, "model.dtype=auto", "train.steps=2", "train.eval_every=2", sources=corpus_slice)
    train(cfg, jax.devices()[:1], log=lines.append)
    assert any(f"computing in {want} (model.dtype=auto: " in line for line in lines)
