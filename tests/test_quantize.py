"""int8, int4, fp4 (MXFP4) and nvfp4 weight-only quantization: the rounding bound, a quantized run that
generate reads, and its held-out loss next to the float run's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.errors import UserError
from llm_jax.inference.engine import Engine, Request
from llm_jax.inference.generate import Generator
from llm_jax.inference.paged import PagedModel
from llm_jax.model.dense import IN_DIMS, quantize
from llm_jax.run import load_run
from llm_jax.tools.quantize import quantize_run
from llm_jax.train.loop import train


@pytest.mark.parametrize("mode, top, group", [("int8", 127, None), ("int4", 7, 32)])
def test_each_weight_is_within_half_a_step_of_its_integer(mode, top, group):
    rng = np.random.default_rng(0)
    params = {
        "layers": {
            name: rng.normal(size=(2, 64, 3, 4) if name == "wo" else (2, 64, 12)).astype(np.float32) for name in IN_DIMS
        },
        "embedding": np.ones((5, 8), np.float32),
    }
    q = quantize(params, mode)
    for name, in_dims in IN_DIMS.items():
        w = params["layers"][name]
        values = np.asarray(q["layers"][name]).astype(np.int8)
        scale = np.asarray(q["layers"][f"{name}_scale"])
        k = int(np.prod(w.shape[1 : 1 + in_dims]))
        n_groups = 1 if group is None else k // group
        assert scale.shape == (2,) + ((n_groups,) if group else ()) + w.shape[1 + in_dims :]
        per_weight = np.repeat(scale.reshape(2, n_groups, -1), k // n_groups, axis=1).reshape(w.shape)
        assert np.all(np.abs(values * per_weight - w) <= per_weight / 2 + 1e-7)
        assert np.abs(values).max() == top  # each group's largest weight uses the full range
    assert q["embedding"] is params["embedding"]


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def test_fp4_weights_are_the_nearest_e2m1_value_times_a_power_of_two_per_block():
    """MXFP4: per block of 32 inputs and output channel, scale = 2^(floor(log2 max|w|) - 2); each value
    is w / scale rounded to the nearest e2m1 value (a direct search of the grid here), saturating at 6."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 64, 12)).astype(np.float32) * rng.uniform(0.01, 10, size=(2, 64, 12)).astype(np.float32)
    params = {"layers": dict.fromkeys(IN_DIMS, None) | {"wq": w}, "embedding": np.ones((5, 8), np.float32)}
    params["layers"] = {n: (w if n != "wo" else w.reshape(2, 64, 3, 4)) for n in IN_DIMS}
    q = quantize(params, "fp4")["layers"]
    values = np.asarray(q["wq"].astype(jnp.float32))
    scale = np.asarray(q["wq_scale"].astype(jnp.float32))  # [2, 2 blocks, 12]
    assert q["wq"].dtype == jnp.float4_e2m1fn and q["wq_scale"].dtype == jnp.float8_e8m0fnu
    blocks = w.reshape(2, 2, 32, 12)
    want_scale = 2.0 ** (np.floor(np.log2(np.abs(blocks).max(axis=2))) - 2)
    np.testing.assert_array_equal(scale, want_scale)
    x = np.clip(blocks / want_scale[:, :, None], -6, 6)
    grid = np.concatenate([-E2M1[::-1], E2M1])
    nearest = grid[np.abs(x[..., None] - grid).argmin(axis=-1)]
    np.testing.assert_array_equal(values.reshape(2, 2, 32, 12), nearest)
    error = np.abs(values.reshape(x.shape) * want_scale[:, :, None] - blocks)
    assert np.all(error <= np.maximum(want_scale[:, :, None], np.abs(blocks) - 6 * want_scale[:, :, None]))


def test_nvfp4_weights_are_the_nearest_e2m1_value_times_an_e4m3_group_scale_and_a_layer_scale():
    """NVFP4: a float32 scale per layer, max|w| / (6 x 448); per group of 16 inputs and output channel an
    e4m3 scale, the group's max|w| / 6 over the layer's scale rounded to e4m3 (ml_dtypes' rounding); each
    value w / (both scales) rounded to the nearest e2m1 value (a direct search of the grid), saturating at 6."""
    import ml_dtypes

    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 64, 12)).astype(np.float32) * rng.uniform(0.01, 10, size=(2, 64, 12)).astype(np.float32)
    params = {"layers": {n: (w if n != "wo" else w.reshape(2, 64, 3, 4)) for n in IN_DIMS}, "embedding": np.ones(1)}
    q = quantize(params, "nvfp4")["layers"]
    assert q["wq"].dtype == jnp.float4_e2m1fn and q["wq_scale"].dtype == jnp.float8_e4m3fn
    values, scale, tensor = (np.asarray(q[k].astype(jnp.float32)) for k in ("wq", "wq_scale", "wq_tensor_scale"))
    want_tensor = np.abs(w).max(axis=(1, 2)) / (6 * 448)
    np.testing.assert_allclose(tensor, want_tensor, rtol=1e-6)
    blocks = w.reshape(2, 4, 16, 12)
    exact = np.abs(blocks).max(axis=2) / 6 / tensor[:, None, None]
    want_scale = exact.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(scale, want_scale)  # [2, 4 groups, 12]
    per_group = want_scale[:, :, None] * tensor[:, None, None, None]
    x = np.clip(blocks / per_group, -6, 6)
    grid = np.concatenate([-E2M1[::-1], E2M1])
    nearest = grid[np.abs(x[..., None] - grid).argmin(axis=-1)]
    np.testing.assert_array_equal(values.reshape(2, 4, 16, 12), nearest)
    error = np.abs(values.reshape(x.shape) * per_group - blocks)  # half the widest e2m1 gap, or the saturation
    assert np.all(error <= np.maximum(per_group, np.abs(blocks) - 6 * per_group) * (1 + 1e-6))
    assert np.abs(values).max() == 6


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, prepared_template, corpus_slice):
    import shutil

    run = tmp_path_factory.mktemp("quant") / "run"
    shutil.copytree(prepared_template, run)
    train(tiny_config(run, "train.steps=30", "train.eval_every=30", sources=corpus_slice), log=lambda *_: None)
    return run


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.01), ("int4", 0.10), ("fp4", 0.10), ("nvfp4", 0.10)])
@pytest.mark.slow
def test_a_quantized_run_keeps_the_held_out_loss_and_generates(float_run, mode, tolerance):
    lines = []
    out = quantize_run(str(float_run), mode, log=lines.append)
    assert out == float_run.with_name(f"run-{mode}")
    ppl = {
        line.split(":")[0].split()[1]: float(line.split("ppl")[1].split("|")[0]) for line in lines if "held-out" in line
    }
    assert set(ppl) == {"float32", "bfloat16", mode}
    assert abs(ppl[mode] - ppl["bfloat16"]) <= tolerance * ppl["bfloat16"], ppl  # int8 within 1%, int4 10%
    quantized = load_run(str(out))
    cfg, params, tokenizer = quantized.cfg, quantized.params, quantized.tokenizer
    dtypes = {"int8": np.int8, "int4": jnp.int4, "fp4": jnp.float4_e2m1fn, "nvfp4": jnp.float4_e2m1fn}
    assert cfg.model.quant == mode and params["layers"]["wq"].dtype == dtypes[mode]
    fparams = load_run(str(float_run)).params
    nbytes = [sum(x.nbytes for x in jax.tree_util.tree_leaves(p)) for p in (params, fparams)]
    assert nbytes[0] < nbytes[1]
    prompt = tokenizer.encode("Romeo.\n")
    greedy = list(Generator(cfg.model, params).stream(prompt, 8))
    assert len(greedy) == 8 and list(Generator(cfg.model, params).stream(prompt, 8)) == greedy
    engine = Engine(PagedModel(cfg.model, params, None, 2, 9, 16, 16, 64), (), 64, False, True)  # what serve runs
    try:
        assert list(engine.submit(Request(prompt, 8, 0.0, 0, 1.0, 0)).tokens()) == greedy
    finally:
        engine.close()
    with pytest.raises(UserError, match="exists; remove it or give --out"):
        quantize_run(str(float_run), mode)
    with pytest.raises(UserError, match="already quantized"):
        quantize_run(str(out), mode, str(out) + "-again")


@pytest.mark.slow
def test_quantize_export_and_eval_read_a_run_split_over_8_devices_and_give_what_one_device_does(float_run, tmp_path):
    """--mesh for the tools (float32 read into its shards, quantized or gathered tensor by tensor): the
    quantized tree, the exported safetensors and the eval record equal the one-device ones."""
    import json

    from safetensors.numpy import load_file

    from llm_jax.evals.harness import run_eval
    from llm_jax.tools.hf import export_hf

    outs = {}
    for mesh in ("1,1,1", "1,4,2"):
        lines = []
        q = quantize_run(str(float_run), "int4", str(tmp_path / f"q{mesh}"), mesh, log=lines.append)
        held_out = [line.split("|", 1)[1] for line in lines if "held-out" in line]
        hf = export_hf(str(float_run), str(tmp_path / f"hf{mesh}"), mesh=mesh, log=lambda *_: None)
        doc = tmp_path / "doc.txt"
        doc.write_text("Good morrow, cousin. What news from court? " * 40)
        mc = tmp_path / "mc.jsonl"
        mc.write_text(json.dumps({"context": "ROMEO.\n", "choices": ["Good morrow", "zebra quantum"], "gold": 0}))
        gen = tmp_path / "gen.jsonl"
        gen.write_text(json.dumps({"prompt": "ROMEO.\n", "answer": "What", "max_tokens": 6}))
        tasks = [f"ppl:{doc}", str(mc), str(gen)]
        record = run_eval(str(float_run), tasks, mesh=mesh, out=str(tmp_path / f"{mesh}.json"), log=lambda *_: None)
        outs[mesh] = (load_run(str(q)).params, held_out, load_file(str(hf / "model.safetensors")), record["results"])
    (q1, held1, hf1, res1), (q8, held8, hf8, res8) = outs.values()
    # float32, bfloat16 and int4 held-out lines; bfloat16 sums over other shards may round a last digit apart
    numbers = [[float(x) for x in re.findall(r"\d+\.\d+", line)] for line in (*held1, *held8)]
    assert len(held1) == 3 and held8[0] == held1[0]
    np.testing.assert_allclose(numbers[3:], numbers[:3], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(q1), jax.tree_util.tree_leaves(q8)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert hf8.keys() == hf1.keys() and all(np.array_equal(hf8[k], hf1[k]) for k in hf1)
    for task, by_key in res1.items():
        for key, metrics in by_key.items():
            for name, value in metrics.items():
                assert res8[task][key][name] == pytest.approx(value, rel=1e-5), (task, key, name)
