"""Every mesh layout computes the same training run as one device; shardings are what the rules say."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.parallel import sharding
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

STEPS = 3
# lr 1e-4: AdamW divides by sqrt(v), so a gradient entry near zero, whose last bits depend on the
# reduction order (which the layout changes), moves its parameter by up to lr either way; at the
# tiny preset's 1e-3, 2 of 16k entries of w_down drifted 1.6e-5 apart after 3 steps.
BASE = ["model.n_kv_heads=4", "model.dtype=float32", "train.batch_size=8", "optim.warmup_steps=1", "optim.lr=1e-4"]


def _config(*overrides):
    return load_config("tiny", BASE + list(overrides))


def _batches(cfg):
    """One random batch, fed STEPS times: the loss must fall, the same way on every layout."""
    shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    return [np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape, dtype=np.int32)] * STEPS


def _run(cfg, devices):
    layout = sharding.make_layout(cfg.mesh, devices)
    layout.check(cfg)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    state, losses = steps.init(jax.random.PRNGKey(0)), []
    for tokens in _batches(cfg):
        state, metrics = steps.train(state, layout.put_batch({"tokens": tokens}))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def reference():
    return _run(_config(), jax.devices()[:1])


LAYOUTS = [  # (rules, data, fsdp, tensor, grad_accum)
    ("dp", 8, 1, 1, 1),
    ("dp", 2, 4, 1, 1),
    ("fsdp", 1, 8, 1, 1),
    ("fsdp", 2, 4, 1, 1),
    ("tp", 2, 1, 4, 1),
    ("fsdp_tp", 8, 1, 1, 1),
    ("fsdp_tp", 2, 2, 2, 2),
    ("fsdp_tp", 1, 2, 4, 1),
]


@pytest.mark.parametrize("rules,data,fsdp,tensor,accum", LAYOUTS)
@pytest.mark.slow
def test_every_layout_trains_like_one_device(reference, rules, data, fsdp, tensor, accum):
    cfg = _config(
        f"mesh.rules={rules}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        f"train.grad_accum={accum}",
    )
    losses, state = _run(cfg, jax.devices())
    ref_losses, ref_state = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    assert losses[-1] < losses[0]
    for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize(
    "rules,mesh,expected",
    [
        (
            "fsdp_tp",
            (1, 2, 4),
            {
                ("layers", "wq"): P(None, "fsdp", "tensor", None),
                ("layers", "wk"): P(None, "fsdp", "tensor", None),
                ("layers", "wo"): P(None, "tensor", None, "fsdp"),
                ("layers", "w_up"): P(None, "fsdp", "tensor"),
                ("layers", "w_down"): P(None, "tensor", "fsdp"),
                ("layers", "attn_norm"): P(None, "fsdp"),
                ("embedding",): P("tensor", "fsdp"),
                ("final_norm",): P("fsdp"),
            },
        ),
        (
            "fsdp",
            (1, 8, 1),
            {
                ("layers", "wq"): P(None, "fsdp"),
                ("layers", "w_down"): P(None, None, "fsdp"),
                ("embedding",): P(None, "fsdp"),
            },
        ),
        ("dp", (8, 1, 1), {("layers", "wq"): P(), ("embedding",): P()}),
    ],
)
def test_parameter_and_optimizer_shardings_follow_the_rules(rules, mesh, expected):
    data, fsdp, tensor = mesh
    cfg = _config(f"mesh.rules={rules}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    layout = sharding.make_layout(cfg.mesh, jax.devices())
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    adam_mu = steps.state_sharding.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    for path, spec in expected.items():
        want, ndim = NamedSharding(layout.mesh, spec), _leaf(steps.abstract_state.params, path).ndim
        assert _leaf(steps.state_sharding.params, path).is_equivalent_to(want, ndim), path
        assert _leaf(adam_mu, path).is_equivalent_to(want, ndim), path
    assert steps.abstract_batch["tokens"].sharding.spec == P(("data", "fsdp", "expert"), None)


def test_vocab_split_logits_never_hold_the_full_vocabulary():
    """tp over 4 devices, vocab 512: each device's logits chunk is [rows, 128], never [rows, 512]."""
    cfg = _config("mesh.rules=tp", "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4")
    steps = make_steps(cfg, sharding.make_layout(cfg.mesh, jax.devices()), make_optimizer(cfg.optim, 10))
    hlo = steps.compile_train().as_text()
    rows = cfg.train.batch_size // 2 * cfg.model.seq_len  # this device's rows: batch split over data=2
    assert f"f32[{rows},128]" in hlo
    assert f"f32[{rows},512]" not in hlo


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["mesh.rules=tp", "mesh.data=2", "mesh.tensor=4", "model.n_kv_heads=2"],
            "kv_heads=2 is split over mesh tensor=4 = 4 shards",
        ),
        (["mesh.data=8", "train.grad_accum=2"], "batch=4 is split over mesh data=8 = 8 shards"),
        (["mesh.rules=dp", "mesh.data=4", "mesh.tensor=2"], "mesh.tensor=2 but the rules split nothing over 'tensor'"),
        (
            ["mesh.data=3"],
            "mesh data=3 pipeline=1 fsdp=1 expert=1 context=1 tensor=1 needs 3 devices but 8 are present",
        ),
        (["mesh.data=2", "mesh.tensor=4", "mesh.dcn_data=4"], "mesh.dcn_data=4 slices must divide the data axis (2)"),
    ],
)
def test_layouts_that_do_not_fit_fail_before_compiling(overrides, message):
    cfg = load_config("tiny", ["model.dtype=float32", "mesh.fsdp=1"] + overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        layout = sharding.make_layout(cfg.mesh, jax.devices())
        layout.check(cfg)


def test_rules_from_a_file_and_their_errors(tmp_path):
    good = tmp_path / "rules.yaml"
    good.write_text("batch: [data, fsdp]\nembed: fsdp\nmlp: tensor\n")
    table = dict(sharding.rules_table(str(good)))
    assert table["batch"] == ("data", "fsdp") and table["mlp"] == "tensor" and table["heads"] is None
    bad_name = tmp_path / "bad_name.yaml"
    bad_name.write_text("embedding: fsdp\n")
    with pytest.raises(UserError, match="unknown logical axis 'embedding'; the model's axes are batch, length"):
        load_config("tiny", [f"mesh.rules={bad_name}"])
    bad_axis = tmp_path / "bad_axis.yaml"
    bad_axis.write_text("embed: model\n")
    with pytest.raises(
        UserError,
        match="embed maps to unknown mesh axis 'model'; mesh axes are data, pipeline, fsdp, expert, context, tensor",
    ):
        load_config("tiny", [f"mesh.rules={bad_axis}"])
    with pytest.raises(UserError, match=r"mesh.rules='zero3' is neither a preset \(dp, fsdp, tp, fsdp_tp, ep\)"):
        load_config("tiny", ["mesh.rules=zero3"])
