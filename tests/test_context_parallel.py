"""Context parallelism (mesh.context, model.context_parallel): a sequence split over devices trains as
one device does, its attention's collectives are what the form says, and its memory falls."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import _config

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.model.context_parallel import balance, unbalance
from llm_jax.parallel import sharding
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

STEPS = 3


def _batch(cfg):
    """Random tokens packed as documents of random lengths (segments restart positions and masks)."""
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    tokens = rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
    segments = np.cumsum(rng.random(shape) < 0.05, axis=1).astype(np.int32) + 1
    return {"tokens": tokens, "segments": segments}


def _run(cfg, devices):
    layout = sharding.make_layout(cfg.mesh, devices)
    layout.check(cfg)
    example = {k: v[0] for k, v in _batch(cfg).items()}
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps), example=example)
    state, losses, norms = steps.init(jax.random.PRNGKey(0)), [], []
    for _ in range(STEPS):
        state, metrics = steps.train(state, layout.put_batch(_batch(cfg)))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, state.params


@pytest.fixture(scope="module")
def references():
    """One device's run per kv-head count (GQA: 2 of 4 heads, MQA: 1)."""
    return {kv: _run(_config(f"model.n_kv_heads={kv}"), jax.devices()[:1]) for kv in (1, 2)}


LAYOUTS = [  # (form, context, data, fsdp, tensor, kv heads)
    ("ring", 2, 4, 1, 1, 2),
    ("ring", 4, 2, 1, 1, 1),
    ("ring", 8, 1, 1, 1, 2),
    ("all_gather", 2, 4, 1, 1, 1),
    ("all_gather", 8, 1, 1, 1, 2),
    ("ring", 2, 2, 2, 1, 2),
    ("all_gather", 2, 2, 2, 1, 1),
    ("ring", 4, 1, 1, 2, 2),
    ("all_gather", 4, 1, 1, 2, 2),
]


@pytest.mark.parametrize("form,context,data,fsdp,tensor,kv", LAYOUTS)
@pytest.mark.slow
def test_a_sequence_split_over_the_context_axis_trains_like_one_device(
    references, form, context, data, fsdp, tensor, kv
):
    cfg = _config(
        f"model.context_parallel={form}",
        f"model.n_kv_heads={kv}",
        f"mesh.context={context}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
    )
    losses, norms, params = _run(cfg, jax.devices())
    ref_losses, ref_norms, ref_params = references[kv]
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_the_balanced_order_gives_each_shard_one_early_and_one_late_chunk():
    x = jnp.arange(2 * 16).reshape(2, 16)
    shards = balance(x, 4).reshape(2, 4, 4)  # 4 shards of 4 tokens: chunks of 2
    assert shards[0].tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert jnp.array_equal(unbalance(balance(x, 4), 4), x)


def _hlo(form: str) -> str:
    cfg = _config(f"model.context_parallel={form}", "mesh.context=8", "mesh.data=1", "model.n_kv_heads=2")
    steps = make_steps(cfg, sharding.make_layout(cfg.mesh, jax.devices()), make_optimizer(cfg.optim, 10))
    return steps.compile_train().as_text()


def test_the_ring_passes_keys_and_values_around_and_never_gathers_them():
    """tiny: seq 64 over 8 devices (8 tokens each), 2 kv heads of 16: a whole K or V is [8, 64, 2, 16]."""
    whole_kv = re.compile(r"= f32\[8,64,2,16\]\S* all-gather\(")
    ring, gathered = _hlo("ring"), _hlo("all_gather")
    assert re.search(r"= f32\[8,8,2,16\]\S* collective-permute\(", ring)  # a shard's K/V block on the move
    assert not whole_kv.search(ring)
    assert whole_kv.search(gathered)


def test_activation_memory_falls_with_the_context_axis():
    """seq 4096 on the tiny model, 2 rows, C devices: the compiled step's temporary bytes per device."""
    temp = {}
    for context in (1, 2, 4, 8):
        cfg = _config("model.seq_len=4096", "train.batch_size=2", f"mesh.context={context}", "mesh.data=1")
        layout = sharding.make_layout(cfg.mesh, jax.devices()[:context])
        steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10))
        temp[context] = steps.compile_train().memory_analysis().temp_size_in_bytes
    print("temporary bytes per device by context:", temp)
    assert temp[1] > temp[2] > temp[4] > temp[8]
    assert temp[8] < temp[1] / 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mesh.context=8", "model.seq_len=72"], "model.seq_len=72 must split into 2 x mesh.context=8 equal chunks"),
        (["mesh.context=2", "model.attention=splash"], "model.attention=splash cannot take a sequence split"),
        (["mesh.context=2", "mesh.pipeline=2"], "mesh.context > 1 with mesh.pipeline > 1 is not supported yet"),
        (["model.context_parallel=ulysses"], "model.context_parallel='ulysses' must be ring or all_gather"),
    ],
)
def test_context_layouts_that_cannot_work_fail_in_one_line(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("tiny", overrides)


def test_an_odd_sequence_is_fine_without_context_and_a_resolved_context_of_minus_one_is_checked():
    assert load_config("tiny", ["model.seq_len=63"]).model.seq_len == 63
    cfg = _config("model.seq_len=72", "mesh.context=-1", "mesh.data=1")  # 8 devices: 16 chunks of 4.5
    with pytest.raises(UserError, match=re.escape("model.seq_len=72 must split into 2 x 8 equal chunks")):
        sharding.make_layout(cfg.mesh, jax.devices()).check(cfg)
