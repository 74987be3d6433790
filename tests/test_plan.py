"""`llm-jax plan`: per-device memory arithmetic, checked by hand and against XLA's own analysis."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.config.rules import rules_table
from llm_jax.errors import UserError
from llm_jax.parallel import sharding
from llm_jax.tools.plan import CHIPS, GiB, activation_bytes, param_bytes, parse_topology, plan_for, suggest
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

LLAMA2_7B = 6_738_415_616  # parameters of Llama 2 7B (untied, vocab 32000)
NORMS_7B = 32 * 2 * 4096 + 4096  # attn_norm + mlp_norm per layer, final_norm: split over fsdp only


@pytest.mark.parametrize(
    "name,kind,chips",
    [("v5p-256", "v5p", 128), ("v5e-256", "v5e", 256), ("v5litepod-16", "v5e", 16), ("h100-8", "h100", 8)],
)
def test_topologies_count_chips(name, kind, chips):
    assert parse_topology(name) == (CHIPS[kind], chips)


@pytest.mark.parametrize(
    "name,message",
    [
        ("tpu-8", "unknown topology 'tpu-8': use <kind>-<size> with kind one of v4"),
        ("v5p-255", "v5p slice names count TensorCores"),
    ],
)
def test_bad_topologies_are_named(name, message):
    with pytest.raises(UserError, match=message):
        parse_topology(name)


def test_parameter_bytes_match_hand_arithmetic():
    cfg = load_config("llama-7b")
    fsdp = {"data": 1, "fsdp": 128, "tensor": 1}
    assert param_bytes(cfg.model, fsdp, rules_table("fsdp")) == LLAMA2_7B * 4 // 128
    # fsdp_tp 32 x 4: every matrix is split 128 ways, the norm scales only 32 ways (embed).
    split = {"data": 1, "fsdp": 32, "tensor": 4}
    assert (
        param_bytes(cfg.model, split, rules_table("fsdp_tp")) == (LLAMA2_7B - NORMS_7B) * 4 // 128 + NORMS_7B * 4 // 32
    )
    assert param_bytes(cfg.model, {"data": 8, "fsdp": 1, "tensor": 1}, rules_table("dp")) == LLAMA2_7B * 4


def test_activation_bytes_follow_the_remat_policy():
    cfg = load_config("llama-7b")  # remat full, bf16, batch 1024 x 4096
    mesh, rules = {"data": 1, "fsdp": 128, "tensor": 1}, rules_table("fsdp")
    act = activation_bytes(cfg.model, 1024, mesh, rules)
    b, t, d = 1024 // 128, 4096, 4096
    assert act["saved across layers"] == 32 * b * t * d * 2 == 8 * GiB  # each layer's input, bf16
    dots = activation_bytes(dataclasses.replace(cfg.model, remat="dots"), 1024, mesh, rules)
    matmul_outs = b * t * (4096 + 2 * 4096 + 4096 + 2 * 11008 + 4096) * 2  # q, k, v, o, gate, up, down
    assert dots["saved across layers"] == 32 * (b * t * d * 2 + matmul_outs)
    # the logits chunk: 4096 rows x 32000 x f32 = 500 MiB, the most rows under the 512 MiB budget
    assert act["logits chunk"] == 4096 * 32000 * (4 + 4 + 2)


@pytest.mark.slow
def test_state_bytes_equal_the_compiled_step_arguments():
    """XLA's memory analysis of the real train step on 8 devices: params + 2 AdamW moments + batch."""
    for rules, mesh in (("dp", (8, 1, 1)), ("fsdp", (1, 8, 1)), ("fsdp_tp", (1, 2, 4))):
        cfg = load_config(
            "tiny",
            [
                "model.n_kv_heads=4",
                f"mesh.rules={rules}",
                f"mesh.data={mesh[0]}",
                f"mesh.fsdp={mesh[1]}",
                f"mesh.tensor={mesh[2]}",
            ],
        )
        layout = sharding.make_layout(cfg.mesh, jax.devices())
        compiled = make_steps(cfg, layout, make_optimizer(cfg.optim, 10)).compile_train()
        params = param_bytes(cfg.model, dict(layout.mesh.shape), layout.rules)
        batch = cfg.train.batch_size // (mesh[0] * mesh[1]) * (cfg.model.seq_len + 1) * 4
        scalars = 4 + 8 + 4 + 4  # step, rng key, adam count, schedule count
        assert compiled.memory_analysis().argument_size_in_bytes == 3 * params + batch + scalars, rules


def test_suggestion_adds_micro_batches_until_the_model_fits():
    cfg = load_config("llama-7b")
    chip, chips = parse_topology("h100-8")
    assert not plan_for(cfg, chip, {"data": 1, "fsdp": 8, "tensor": 1}).fits  # 128 GiB of saved inputs alone
    best, accum = suggest(cfg, chip, chips)
    assert (best.mesh, accum) == ({"data": 1, "fsdp": 8, "tensor": 1}, 4)
    assert best.rows["saved across layers"] == 32 * GiB and best.fits


def test_plan_command_prints_the_table_and_the_suggestion(capsys):
    main(["plan", "--config", "llama-7b", "--topology", "v5p-256"])
    out = capsys.readouterr().out
    assert "v5p-256: 128 chips x 95 GiB" in out
    assert "parameters (f32)                     0.20 GiB" in out
    assert "suggested: mesh.data=64 mesh.fsdp=2 mesh.tensor=1 train.grad_accum=1" in out


def test_plan_reports_a_mesh_that_does_not_fit_the_chips():
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "llama-7b", "--topology", "v5p-256", "mesh.fsdp=64"])
    assert e.value.code == 2
