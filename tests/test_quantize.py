"""int8 weight-only quantization: the rounding bound, a quantized run that generate reads, and its
held-out loss next to the float run's."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.cli import load_run
from llm_jax.errors import UserError
from llm_jax.generate import Generator
from llm_jax.quantize import IN_DIMS, quantize_int8, quantize_run
from llm_jax.train.loop import train


def test_each_weight_is_within_half_a_step_of_its_int8_value():
    rng = np.random.default_rng(0)
    params = {"layers": {name: rng.normal(size=(2, 8, 3, 4) if name == "wo" else (2, 8, 12)).astype(np.float32)
                         for name in IN_DIMS}, "embedding": np.ones((5, 8), np.float32)}
    q = quantize_int8(params)
    for name, in_dims in IN_DIMS.items():
        values, scale = np.asarray(q["layers"][name]), np.asarray(q["layers"][f"{name}_scale"])
        assert values.dtype == np.int8 and scale.shape == (2,) + params["layers"][name].shape[1 + in_dims:]
        restored = values * scale.reshape(scale.shape[:1] + (1,) * in_dims + scale.shape[1:])
        assert np.abs(restored - params["layers"][name]).max() <= scale.max() / 2 + 1e-7
        assert np.abs(values).max() == 127  # each channel's largest weight uses the full range
    assert q["embedding"] is params["embedding"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, prepared_template, corpus_slice):
    import shutil

    run = tmp_path_factory.mktemp("quant") / "run"
    shutil.copytree(prepared_template, run)
    train(tiny_config(run, "train.steps=30", "train.eval_every=30", sources=corpus_slice), log=lambda *_: None)
    return run


def test_a_quantized_run_keeps_the_held_out_loss_and_generates(float_run):
    lines = []
    out = quantize_run(str(float_run), "int8", log=lines.append)
    assert out == float_run.with_name("run-int8")
    bpb = {line.split(":")[0].split()[-1]: float(line.rsplit("bpb", 1)[1]) for line in lines if "held-out" in line}
    assert abs(bpb["int8"] - bpb["float32"]) <= 0.01 * bpb["float32"], bpb
    cfg, params, tokenizer, _ = load_run(str(out))
    assert cfg.model.quant == "int8" and params["layers"]["wq"].dtype == np.int8
    fcfg, fparams, _, _ = load_run(str(float_run))
    nbytes = [sum(x.nbytes for x in jax.tree_util.tree_leaves(p)) for p in (params, fparams)]
    assert nbytes[0] < nbytes[1]
    prompt = tokenizer.encode("Romeo.\n")
    assert len(list(Generator(cfg.model, params).stream(prompt, 8))) == 8
    with pytest.raises(UserError, match="exists; remove it or give --out"):
        quantize_run(str(float_run), "int8")
    with pytest.raises(UserError, match="already quantized"):
        quantize_run(str(out), "int8", str(out) + "-again")
