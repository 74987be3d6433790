"""Pipeline parallelism (llm_jax/model/pipeline.py), GPipe and circular: exact against the unpipelined
model, composed with data and fsdp, checkpoints portable across stage and repeat counts, bad input named."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.parallel import sharding
from llm_jax.train.loop import train
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

pytestmark = pytest.mark.slow  # every test here starts processes or compiles several steps

BATCH, STEPS = 16, 3


def _run(*overrides):
    """STEPS optimizer steps on fixed random batches -> (losses, grad norms, final params)."""
    cfg = tiny_config("unused", "model.n_layers=4", f"train.batch_size={BATCH}", *overrides)
    layout = sharding.make_layout(cfg.mesh)
    layout.check(cfg)
    window = np.zeros(cfg.model.seq_len + 1, np.int32)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10), example={"tokens": window, "segments": window})
    state = steps.init(jax.random.PRNGKey(0))
    rng, losses, norms = np.random.default_rng(0), [], []
    for _ in range(STEPS):
        tokens = rng.integers(3, cfg.model.vocab_size, (BATCH, cfg.model.seq_len + 1)).astype(np.int32)
        segments = np.cumsum(tokens == 1, axis=1).astype(np.int32)  # a few document boundaries
        state, metrics = steps.train(state, layout.put_batch({"tokens": tokens, "segments": segments}))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, jax.device_get(steps.to_layer_order(state).params)  # a circular pipeline: stage order


@pytest.fixture(scope="module")
def unpipelined():
    return _run("mesh.data=8")


@pytest.fixture(scope="module")
def unpipelined_8_layers():
    return _run("mesh.data=8", "model.n_layers=8")


def _assert_same_steps(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)  # losses
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)  # gradient norms
    for g, w in zip(jax.tree_util.tree_leaves(got[2]), jax.tree_util.tree_leaves(want[2]), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "mesh, microbatches, remat",
    [
        ("mesh.data=2 mesh.fsdp=2 mesh.pipeline=2", 2, "none"),
        ("mesh.data=2 mesh.fsdp=2 mesh.pipeline=2", 4, "full"),
        ("mesh.data=2 mesh.pipeline=4", 4, "dots"),
        ("mesh.data=2 mesh.pipeline=4", 8, "full"),
    ],
)
def test_pipelined_steps_match_the_unpipelined_model(unpipelined, mesh, microbatches, remat):
    _assert_same_steps(_run(*mesh.split(), f"mesh.microbatches={microbatches}", f"model.remat={remat}"), unpipelined)


@pytest.mark.parametrize(
    "mesh, microbatches, remat",
    [
        ("mesh.data=2 mesh.fsdp=2 mesh.pipeline=2", 2, "none"),
        ("mesh.data=2 mesh.fsdp=2 mesh.pipeline=2", 4, "full"),
        ("mesh.data=2 mesh.pipeline=4", 4, "dots"),
        ("mesh.data=2 mesh.pipeline=4", 8, "full"),
        ("mesh.data=1 mesh.fsdp=2 mesh.pipeline=4", 8, "none"),
    ],
)
def test_circular_pipelines_match_the_unpipelined_model(unpipelined_8_layers, mesh, microbatches, remat):
    """Two repeats: stage s holds chunks s and s + S of the 8 layers (2 x S chunks), each micro-batch
    goes round the stages twice; the parameters come back in layer order to compare."""
    got = _run(
        "model.n_layers=8", *mesh.split(), "mesh.pipeline_repeats=2", f"mesh.microbatches={microbatches}",
        f"model.remat={remat}",
    )  # fmt: skip
    _assert_same_steps(got, unpipelined_8_layers)


def test_stage_order_puts_each_stages_chunks_together_and_back():
    from llm_jax.model.pipeline import to_layer_order, to_stage_order

    layers = {"layers": {"w": np.arange(8)}, "embedding": np.arange(8)}
    staged = to_stage_order(layers, stages=2, repeats=2)  # chunks of 2 layers: 0 1 | 2 3 | 4 5 | 6 7
    # stage 0 holds chunks 0 and 2 (layers 0 1 and 4 5), stage 1 chunks 1 and 3, each layer's rounds together
    np.testing.assert_array_equal(staged["layers"]["w"], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(staged["embedding"], np.arange(8))  # only what is under `layers` moves
    np.testing.assert_array_equal(to_layer_order(staged, stages=2, repeats=2)["layers"]["w"], np.arange(8))
    np.testing.assert_array_equal(to_stage_order(layers, stages=4, repeats=1)["layers"]["w"], np.arange(8))


@pytest.mark.parametrize(
    "mesh, microbatches", [("mesh.data=2 mesh.fsdp=2 mesh.pipeline=2", 4), ("mesh.data=2 mesh.pipeline=4", 8)]
)
def test_pipelined_gradients_equal_the_unpipelined_ones(mesh, microbatches):
    from llm_jax.model.transformer import Transformer
    from llm_jax.train.losses import lm_sums

    cfg = tiny_config(
        "unused", "model.n_layers=4", "model.remat=full", *mesh.split(), f"mesh.microbatches={microbatches}"
    )
    layout = sharding.make_layout(cfg.mesh)
    tokens = np.random.default_rng(1).integers(3, cfg.model.vocab_size, (BATCH, cfg.model.seq_len + 1))
    batch = layout.put_batch(
        {"tokens": tokens.astype(np.int32), "segments": np.cumsum(tokens == 1, axis=1).astype(np.int32)}
    )
    grads = {}
    for stages in (1, cfg.mesh.pipeline):
        model = Transformer(cfg.model, pipeline=(stages, microbatches, 1))
        with layout.activate():
            params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"][:, :-1])["params"]
            grads[stages] = jax.device_get(jax.jit(jax.grad(lambda p, m=model: lm_sums(m, p, batch)[0]))(params))
    for got, want in zip(jax.tree_util.tree_leaves(grads[cfg.mesh.pipeline]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stages_hold_their_own_layers_and_pass_activations_to_neighbours():
    cfg = tiny_config("unused", "model.n_layers=4", "mesh.data=2", "mesh.fsdp=2", "mesh.pipeline=2")
    layout = sharding.make_layout(cfg.mesh)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10))
    wq = steps.state_sharding.params["layers"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.spec[0] == "pipeline" and wq.shard_shape((4, 64, 4, 16))[0] == 2  # 2 of the 4 layers per stage
    hlo = steps.compile_train().as_text()
    assert "collective-permute" in hlo  # the stage-to-stage shift, not a gather of every stage's work


def test_a_circular_stage_keeps_its_chunks_and_saves_no_weights_per_tick():
    def compiled(*overrides):
        cfg = tiny_config(
            "unused", "model.n_layers=8", f"train.batch_size={BATCH}", "mesh.data=2", "mesh.pipeline=4",
            "mesh.microbatches=8", *overrides,
        )  # fmt: skip
        layout = sharding.make_layout(cfg.mesh)
        layout.check(cfg)
        steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10))
        return steps.compile_train()

    circular, gpipe = compiled("mesh.pipeline_repeats=2"), compiled()
    hlo = circular.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo  # no stage fetches another's weights
    # 8 x 2 + 3 ticks of 1 layer vs 8 + 3 ticks of 2 layers: about the same saved activations, and the
    # weights of each tick's round are picked again in the backward, not kept per tick
    assert circular.memory_analysis().temp_size_in_bytes <= 1.1 * gpipe.memory_analysis().temp_size_in_bytes


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize(
    "first, then",
    [  # each layout writes once and reads once: unpipelined -> pipelined -> circular -> unpipelined
        ("mesh.pipeline=1", "mesh.pipeline=2"),
        ("mesh.pipeline=2", "mesh.pipeline=4 mesh.pipeline_repeats=2"),
        ("mesh.pipeline=4 mesh.pipeline_repeats=2", "mesh.pipeline=1"),
    ],
)
def test_checkpoints_move_between_pipelined_and_unpipelined_runs(prepared_run, corpus_slice, first, then):
    """Checkpoints keep the layers in order whatever the stages and repeats (a circular pipeline's state
    is in stage order between checkpoints), so a run resumes on any of them."""
    overrides = (
        "model.n_layers=8",
        "mesh.data=-1",
        "train.steps=4",
        "train.log_every=1",
        "train.eval_every=4",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
    )
    train(tiny_config(prepared_run, *overrides, *first.split(), sources=corpus_slice), log=lambda *_: None)
    uninterrupted = _metrics(prepared_run)
    shutil.rmtree(prepared_run / "checkpoints" / "4")  # resume from step 2 on the other layout
    train(tiny_config(prepared_run, *overrides, *then.split(), sources=corpus_slice), log=lambda *_: None)
    resumed = _metrics(prepared_run)
    np.testing.assert_allclose([resumed[s] for s in (3, 4)], [uninterrupted[s] for s in (3, 4)], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layers=6", "mesh.pipeline=4"], "model.n_layers=6 does not split into mesh.pipeline=4 equal stages"),
        (
            ["model.n_layers=4", "mesh.pipeline=4", "mesh.microbatches=2"],
            "mesh.microbatches=2 is fewer than the mesh.pipeline=4 stages",
        ),
        (
            ["model.n_layers=4", "mesh.pipeline=2", "mesh.microbatches=3", "train.batch_size=8"],
            r"the 8 sequences of each step \(train.batch_size / train.grad_accum\) do not split into 3 pipeline "
            r"micro-batches \(mesh.microbatches=3\)",
        ),
        (
            ["model.n_layers=3", "mesh.pipeline=3", "train.batch_size=8"],
            r"do not split into 3 pipeline micro-batches \(mesh.microbatches=0, i.e. one per stage\)",
        ),
        (
            ["model.n_layers=6", "mesh.pipeline=2", "mesh.pipeline_repeats=2"],
            r"the 3 layers per stage \(model.n_layers=6 / mesh.pipeline=2\) do not split into "
            r"mesh.pipeline_repeats=2 equal chunks",
        ),
        (["mesh.pipeline_repeats=2"], "mesh.pipeline_repeats=2 needs pipeline stages: set mesh.pipeline > 1"),
        (["mesh.pipeline=2", "mesh.pipeline_repeats=0"], "mesh.pipeline_repeats=0 must be positive"),
    ],
)
def test_bad_pipeline_settings_name_the_numbers(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny", overrides)


def test_a_micro_batch_too_small_for_the_batch_shards_is_named():
    cfg = tiny_config(
        "unused", "model.n_layers=4", "mesh.data=4", "mesh.pipeline=2", "mesh.microbatches=4", "train.batch_size=8"
    )
    with pytest.raises(UserError, match="batch=2 is split over mesh data=4 = 4 shards"):
        sharding.make_layout(cfg.mesh).check(cfg)
