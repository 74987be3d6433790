import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.errors import UserError
from llm_jax.parallel import sharding
from llm_jax.run import check_resumable, load_run
from llm_jax.train.loop import train
from llm_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer
from llm_jax.train.step import make_steps

ROOT = Path(__file__).resolve().parent.parent


def _batch(cfg, seed=0, rows=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.model.vocab_size, (rows or cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32)


def test_a_tiny_model_overfits_one_batch(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "train.steps=60",
        "optim.weight_decay=0",
        "train.batch_size=2",
    )
    layout = sharding.single_device_layout()
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    state = steps.init(jax.random.PRNGKey(0))
    batch = layout.put_batch({"tokens": _batch(cfg)})
    losses = []
    for _ in range(60):
        state, metrics = steps.train(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(cfg.model.vocab_size), abs=0.1)  # uniform at init
    assert losses[-1] < 0.05, losses[::10]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = []
    for accum in (1, 4):
        cfg = tiny_config(tmp_path, f"train.grad_accum={accum}", "train.batch_size=32", "optim.warmup_steps=0")
        layout = sharding.single_device_layout()
        steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
        state = steps.init(jax.random.PRNGKey(0))
        losses = []
        for i in range(3):
            state, metrics = steps.train(state, layout.put_batch({"tokens": _batch(cfg, seed=i)}))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *[r[1] for r in results])


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config("x", "optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "train.steps=110")
    sched = lr_schedule(cfg.optim, cfg.train.steps)
    assert float(sched(0)) == 0 and float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3) and float(sched(60)) == pytest.approx(5.5e-4, rel=1e-3)
    assert float(sched(110)) == pytest.approx(1e-4)


def test_wsd_schedule_holds_then_decays_over_the_last_fraction():
    cfg = tiny_config("x", "optim.schedule=wsd", "optim.lr=1e-3", "optim.warmup_steps=10")
    cfg = cfg.__class__(**{**cfg.__dict__, "optim": cfg.optim.__class__(**{**cfg.optim.__dict__, "min_lr_ratio": 0.0})})
    sched = lr_schedule(cfg.optim, 100)  # decay_fraction 0.2: lr held from step 10 to 80, then down to 0
    assert float(sched(5)) == pytest.approx(5e-4) and float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(79)) == pytest.approx(1e-3) and float(sched(80)) == pytest.approx(1e-3)
    assert float(sched(90)) == pytest.approx(5e-4) and float(sched(100)) == pytest.approx(0, abs=1e-9)
    short = lr_schedule(cfg.optim, 12)  # warmup 10 leaves 2 steps: the decay takes them and still ends at 0
    assert float(short(10)) == pytest.approx(1e-3) and float(short(12)) == pytest.approx(0, abs=1e-9)


def test_muon_orthogonalises_the_layer_matrices_and_adamw_the_rest():
    """Muon's update of each layer's matrix (per layer, as its [in, out] matmul) has all its singular
    values equal (orthogonalised momentum), AdamW's does not; the embedding and norms get AdamW's."""
    cfg = tiny_config("x", "optim.name=muon", "optim.weight_decay=0", "optim.warmup_steps=0", "optim.grad_clip=0")
    params = jax.device_get(
        make_steps(cfg, sharding.single_device_layout(), make_optimizer(cfg.optim, 10))
        .init(jax.random.PRNGKey(0))
        .params
    )
    grads = jax.tree_util.tree_map(lambda x: np.random.default_rng(x.size).normal(size=x.shape), params)
    updates = {}
    for name in ("muon", "adamw"):
        o = cfg.optim.__class__(**{**cfg.optim.__dict__, "name": name})
        tx = make_optimizer(o, 10)
        updates[name], _ = tx.update(grads, tx.init(params), params)
    for name in ("wq", "w_down"):  # layer 0, as the [in, out] matrix of its matmul
        muon, adamw = (np.asarray(updates[k]["layers"][name][0]) for k in ("muon", "adamw"))
        cond = [
            (lambda sv: sv.max() / sv.min())(np.linalg.svd(u.reshape(u.shape[0], -1), compute_uv=False))
            for u in (muon, adamw)
        ]
        assert cond[0] < 2.5 and cond[1] > 2 * cond[0]  # Newton-Schulz's 5 steps land singular values in ~[0.7, 1.2]
    for leaf in ("embedding", "final_norm"):  # not matrices of a layer: AdamW's update, the same
        np.testing.assert_allclose(updates["muon"][leaf], updates["adamw"][leaf], rtol=1e-5)


def test_z_loss_is_trained_and_logged_on_its_own():
    cfg = tiny_config("x", "optim.z_loss=1e-2")
    layout = sharding.single_device_layout()
    tokens = _batch(cfg, seed=0)
    runs = {}
    for z in (0.0, 1e-2):
        c = cfg.__class__(**{**cfg.__dict__, "optim": cfg.optim.__class__(**{**cfg.optim.__dict__, "z_loss": z})})
        steps = make_steps(c, layout, make_optimizer(c.optim, c.train.steps))
        _, runs[z] = steps.train(steps.init(jax.random.PRNGKey(0)), layout.put_batch({"tokens": tokens}))
    assert "z_loss" not in runs[0.0] and float(runs[1e-2]["z_loss"]) > 0
    # the train loss includes the term: the same first step, plus z x mean log(Z)^2
    assert float(runs[1e-2]["loss"]) == pytest.approx(float(runs[0.0]["loss"]) + float(runs[1e-2]["z_loss"]), rel=1e-5)


def test_weight_decay_skips_norm_scales():
    params = {"embedding": 0, "final_norm": 0, "layers": {"attn_norm": 0, "mlp_norm": 0, "wq": 0, "w_down": 0}}
    assert decay_mask(params) == {
        "embedding": True,
        "final_norm": False,
        "layers": {"attn_norm": False, "mlp_norm": False, "wq": True, "w_down": True},
    }


def _metrics(run: Path, split="train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


@pytest.mark.parametrize("elsewhere", [False, True], ids=["run_dir", "checkpoint_dir"])
@pytest.mark.slow
def test_resume_continues_exactly_like_the_uninterrupted_run(prepared_run, corpus_slice, tmp_path, elsewhere):
    # train.checkpoint_dir: any path etils.epath opens (gs:// on TPU VMs); here a directory outside the run
    ckpts = tmp_path / "bucket" / "ckpts" if elsewhere else prepared_run / "checkpoints"
    overrides = (
        "train.steps=16",
        "train.log_every=1",
        "train.eval_every=8",
        "train.checkpoint_every=8",
        "train.keep_checkpoints=5",
    ) + ((f"train.checkpoint_dir={ckpts}",) if elsewhere else ())
    cfg = tiny_config(prepared_run, *overrides, sources=corpus_slice)
    final = train(cfg, log=lambda *_: None)
    full = _metrics(prepared_run)
    full_params = jax.device_get(_restore_params(ckpts / "16", cfg))
    # Lose everything after step 8, as a crash right after that checkpoint would, then rerun.
    shutil.rmtree(ckpts / "16")
    resumed_final = train(cfg, log=lambda *_: None)
    resumed = _metrics(prepared_run)
    assert sorted(resumed) == list(range(1, 17))
    for step in range(9, 17):
        assert resumed[step]["loss"] == full[step]["loss"], step
    assert resumed_final == final
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, full_params, jax.device_get(_restore_params(ckpts / "16", cfg))
    )
    assert (prepared_run / "checkpoints").exists() != elsewhere
    assert load_run(str(prepared_run)).step == 16  # generate, serve, eval find them through config.yaml


def _restore_params(step_dir, cfg):
    from llm_jax.parallel.sharding import abstract_params
    from llm_jax.run import restore_params

    layout = sharding.single_device_layout()
    return restore_params(step_dir, abstract_params(cfg.model, layout))


@pytest.mark.slow
def test_a_run_directory_refuses_a_different_model(prepared_run, corpus_slice):
    train(tiny_config(prepared_run, "train.steps=2", sources=corpus_slice), log=lambda *_: None)
    with pytest.raises(UserError, match=r"(?s)different config:\n  model.d_model: 64 -> 96\n.*run_dir=<new dir>"):
        train(tiny_config(prepared_run, "train.steps=4", "model.d_model=96", sources=corpus_slice))
    # How the step computes is not what it saved: a run resumes in another dtype, remat or kernel.
    unpinned = ("model.dtype=bfloat16", "model.remat=full", "model.attention=xla")
    check_resumable(tiny_config(prepared_run, *unpinned, sources=corpus_slice), prepared_run)
    with pytest.raises(
        UserError,
        match=r"does not match the model config:\n  layers/w_down: checkpoint \(2, 128, 64\) vs config \(2, 96, 64\)",
    ):
        _restore_params(prepared_run / "checkpoints" / "2", tiny_config(prepared_run, "model.mlp_dim=96"))


def test_mesh_must_match_the_devices(prepared_run, corpus_slice):
    with pytest.raises(UserError, match=r"needs 3 devices but 8 are present"):
        train(tiny_config(prepared_run, "mesh.data=3", sources=corpus_slice))
    with pytest.raises(UserError, match=r"batch=4 is split over mesh data=8 = 8 shards"):
        train(tiny_config(prepared_run, "train.batch_size=4", sources=corpus_slice))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(prepared_run, corpus_slice):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "tiny",
        f"run_dir={prepared_run}",
        f"data.sources=[{','.join(corpus_slice)}]",
        "train.steps=100000",
        "train.log_every=1",
        "train.checkpoint_every=100000",
        "mesh.data=1",
    ]
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and "/100000" in line and len([x for x in lines if x.startswith("step")]) >= 3:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    assert "SIGTERM received: saving a checkpoint" in out and "checkpoint saved in" in out
    saved = [int(p.name) for p in (prepared_run / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert "Traceback" not in out

    rerun = subprocess.run(
        cmd[:-4] + [f"train.steps={saved[0] + 2}", "mesh.data=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {prepared_run / 'checkpoints' / str(saved[0])} (step {saved[0]})" in rerun.stdout
    assert f"step {saved[0] + 2}/{saved[0] + 2}" in rerun.stdout


@pytest.mark.slow
def test_a_sharded_train_step_with_splash_attention_equals_xla(prepared_template, corpus_slice, tmp_path):
    """The TPU Pallas kernel (interpret mode here) inside the scanned, rematerialised layers on a
    2 x 2 x 2 mesh, through shard_map: the same losses as the XLA kernel."""
    losses = {}
    for impl in ("xla", "splash"):
        run = tmp_path / impl
        shutil.copytree(prepared_template, run)
        train(
            tiny_config(
                run,
                "model.seq_len=128",
                f"model.attention={impl}",
                "model.remat=full",
                "train.steps=3",
                "train.log_every=1",
                "mesh.data=2",
                "mesh.fsdp=2",
                "mesh.tensor=2",
                "sample.max_new_tokens=2",
                sources=corpus_slice,
            ),
            log=lambda *_: None,
        )
        losses[impl] = [r["loss"] for r in _metrics(run).values()]
    np.testing.assert_allclose(losses["splash"], losses["xla"], rtol=1e-5)
