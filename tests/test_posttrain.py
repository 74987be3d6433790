"""SFT and DPO objectives and steps: masking, packing, the DPO loss, the reference at step 0, sharding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import DPOConfig, load_config, save_config
from llm_jax.model.transformer import Transformer
from llm_jax.parallel import sharding
from llm_jax.train import losses
from llm_jax.train.objectives import pair_scorer
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

BASE = ["model.n_kv_heads=4", "model.dtype=float32", "train.batch_size=8", "optim.warmup_steps=1", "optim.lr=1e-4"]


@pytest.fixture(scope="module")
def model_and_params():
    cfg = load_config("tiny", BASE).model
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    return cfg, model, params


def _per_token_nll(model, params, tokens, segments=None):
    hidden, _ = model.apply({"params": params}, tokens[:, :-1], segments=segments)
    return -model.apply({"params": params}, hidden, tokens[:, 1:], method=Transformer.token_logps)


@pytest.mark.slow
def test_sft_loss_and_gradients_ignore_prompt_tokens(model_and_params):
    cfg, model, params = model_and_params
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 33)), jnp.int32)
    weights = jnp.zeros((2, 32)).at[:, 20:27].set(1.0)  # "assistant" targets 21..27 only
    batch = {"tokens": tokens, "weights": weights}

    loss, _ = losses.lm_sums(model, params, batch)
    nll = _per_token_nll(model, params, tokens)
    np.testing.assert_allclose(float(loss), float(jnp.sum(nll[:, 20:27])), rtol=1e-6)

    def masked(p):
        return losses.lm_sums(model, p, batch)[0]

    def answer_only(p):
        return jnp.sum(_per_token_nll(model, p, tokens)[:, 20:27])

    g1, g2 = jax.grad(masked)(params), jax.grad(answer_only)(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert losses.lm_count(batch) == 14


@pytest.mark.slow
def test_packed_examples_do_not_attend_across(model_and_params):
    cfg, model, params = model_and_params
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, cfg.vocab_size, 21), rng.integers(1, cfg.vocab_size, 12)
    packed = jnp.asarray(np.concatenate([a, b, np.zeros(32, int)])[None], jnp.int32)  # 65 = L + 1
    segments = jnp.asarray(np.array([1] * 21 + [2] * 12 + [0] * 32)[None], jnp.int32)
    nll = _per_token_nll(model, params, packed, segments[:, :-1])
    alone_a = _per_token_nll(model, params, jnp.asarray(a[None], jnp.int32))
    alone_b = _per_token_nll(model, params, jnp.asarray(b[None], jnp.int32))
    np.testing.assert_allclose(nll[0, :20], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(nll[0, 21:32], alone_b[0], atol=1e-5)
    # and B's second token is predicted exactly as at the start of a sequence (positions restart)
    changed = packed.at[0, :21].set(jnp.asarray(rng.integers(1, cfg.vocab_size, 21), jnp.int32))
    np.testing.assert_allclose(
        _per_token_nll(model, params, changed, segments[:, :-1])[0, 21:32], nll[0, 21:32], atol=1e-5
    )


def test_dpo_loss_by_hand():
    logps, ref = jnp.asarray([[-1.0, -3.0], [-4.0, -2.0]]), jnp.asarray([[-2.0, -2.0], [-4.0, -3.0]])
    # margins: (1 - -1) = 2 and (0 - 1) = -1; beta 0.1
    sigmoid, rewards = losses.dpo_loss(logps, ref, DPOConfig(0.1, "sigmoid", 0.0, 0.0, "precomputed"))
    np.testing.assert_allclose(sigmoid, [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.1))], rtol=1e-6)
    np.testing.assert_allclose(rewards, [[0.1, -0.1], [0.0, 0.1]], atol=1e-7)
    smooth, _ = losses.dpo_loss(logps, ref, DPOConfig(0.1, "sigmoid", 0.2, 0.0, "precomputed"))
    np.testing.assert_allclose(smooth[0], 0.8 * math.log1p(math.exp(-0.2)) + 0.2 * math.log1p(math.exp(0.2)), rtol=1e-6)
    ipo, _ = losses.dpo_loss(logps, ref, DPOConfig(0.1, "ipo", 0.0, 0.0, "precomputed"))
    np.testing.assert_allclose(ipo, [(2 - 5) ** 2, (-1 - 5) ** 2], rtol=1e-6)
    # RPO: + 0.5 x the chosen mean token NLL (chosen responses of 2 and 4 tokens)
    rpo_cfg = DPOConfig(0.1, "sigmoid", 0.0, 0.5, "precomputed")
    rpo, _ = losses.dpo_loss(logps, ref, rpo_cfg, jnp.asarray([2.0, 4.0]))
    np.testing.assert_allclose(rpo - sigmoid, [0.5 * 1 / 2, 0.5 * 4 / 4], rtol=1e-6)


def _dpo_config(tmp_path, *overrides):
    start = tmp_path / "start"
    start.mkdir(exist_ok=True)
    save_config(load_config("tiny", BASE), start / "config.yaml")
    return load_config("tiny", BASE + ["train.objective=dpo", f"train.init_from={start}", *overrides])


def _pairs(cfg, n=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.model.vocab_size, (n, 2, 41)).astype(np.int32)
    tokens[:, 1, :20] = tokens[:, 0, :20]  # a shared prompt, then different responses
    weights = np.zeros((n, 2, 40), np.float32)
    weights[:, :, 19:] = 1.0  # targets 20.. are the response
    return {"tokens": tokens, "weights": weights}


def _dpo_run(cfg, devices, batches):
    layout = sharding.make_layout(cfg.mesh, devices)
    example = {k: v[0] for k, v in batches[0].items()}
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps), example=example)
    state, out = steps.init(jax.random.PRNGKey(0)), []
    for batch in batches:
        state, metrics = steps.train(state, layout.put_batch(batch))
        out.append({k: float(v) for k, v in metrics.items()})
    return out, state, steps


@pytest.mark.parametrize("reference", ["in_step", "precomputed"])
@pytest.mark.slow
def test_dpo_starts_at_log2_with_the_policy_as_reference(tmp_path, reference):
    cfg = _dpo_config(tmp_path, f"dpo.reference={reference}")
    batch = _pairs(cfg)
    if reference == "precomputed":  # scored by the same starting parameters, as the loop does
        layout = sharding.single_device_layout()
        steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10), example={k: v[0] for k, v in batch.items()})
        params = steps.init(jax.random.PRNGKey(0)).params
        with layout.activate():
            batch["ref_logps"] = np.asarray(pair_scorer(cfg.model, layout)(params, layout.put_batch(batch)))
    metrics, state, _ = _dpo_run(cfg, jax.devices()[:1], [batch] * 3)
    np.testing.assert_allclose(metrics[0]["loss"], math.log(2), atol=1e-6)
    # (reward accuracy counts margins > 0: at step 1 those are float noise around 0, whichever way it falls)
    assert abs(metrics[0]["reward_margin"]) < 1e-6
    assert metrics[2]["loss"] < metrics[0]["loss"] and metrics[2]["reward_margin"] > 0  # it learns the preference
    assert (state.ref_params is not None) == (reference == "in_step")


@pytest.mark.parametrize("rules,data,fsdp,tensor,accum", [("fsdp_tp", 2, 2, 2, 2), ("dp", 8, 1, 1, 1)])
@pytest.mark.slow
def test_sharded_dpo_step_equals_one_device(tmp_path, rules, data, fsdp, tensor, accum):
    batches = [_pairs(_dpo_config(tmp_path), seed=s) for s in range(2)]
    one, one_state, _ = _dpo_run(_dpo_config(tmp_path, "dpo.reference=in_step"), jax.devices()[:1], batches)
    cfg = _dpo_config(
        tmp_path,
        "dpo.reference=in_step",
        f"mesh.rules={rules}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        f"train.grad_accum={accum}",
    )
    many, many_state, steps = _dpo_run(cfg, jax.devices(), batches)
    for a, b in zip(one, many):
        for k in a:
            # while the policy still equals the reference (lr 0 at the first step), the accuracy is the
            # sign of float noise around a zero margin (see above), whichever way each pair falls
            if not (k == "reward_accuracy" and abs(a["reward_margin"]) < 1e-5):
                np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(one_state.params), jax.tree_util.tree_leaves(many_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the reference copy is sharded like the parameters
    assert jax.tree_util.tree_leaves(steps.state_sharding.ref_params) == jax.tree_util.tree_leaves(
        steps.state_sharding.params
    )


@pytest.mark.slow
def test_pretrain_then_sft_then_dpo_runs_and_chat(tmp_path, prepared_run, capsys, monkeypatch):
    """The whole chain on the tiny preset: each stage starts from the previous run's checkpoint and
    tokenizer; DPO's first step scores log 2; the chat CLI and eval-chat read the result."""
    import io
    import json

    from conftest import tiny_config

    from llm_jax.cli import main as cli
    from llm_jax.data import synth
    from llm_jax.train.loop import train

    train(tiny_config(prepared_run, "train.steps=2"), log=lambda *_: None)
    sft_data, dpo_data = synth.write_sft(tmp_path / "sft", 300, 0), synth.write_dpo(tmp_path / "dpo", 300, 0)

    def stage(name, start, data, *extra):
        return load_config(
            "tiny",
            [
                f"run_dir={tmp_path / name}",
                f"train.objective={name}",
                f"train.init_from={start}",
                f"data.sources=[{data['train']}]",
                f"data.val_sources=[{data['test']}]",
                "train.steps=3",
                "train.log_every=1",
                "train.eval_every=3",
                *extra,
            ],
        )

    logs = []
    sft_val = train(stage("sft", prepared_run, sft_data, "sample.prompts=What is 2 + 3?"), log=logs.append)
    assert any(line.startswith("initialised from") for line in logs)
    assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (prepared_run / "tokenizer.model").read_bytes()
    assert 0 < sft_val["loss"] < 10
    assert "user: What is 2 + 3?\nassistant:" in (tmp_path / "sft" / "samples.txt").read_text()

    dpo_val = train(stage("dpo", tmp_path / "sft", dpo_data), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(rows[0]["loss"], math.log(2), atol=1e-5)  # step 1: policy == reference
    ref = np.load(tmp_path / "dpo" / "data" / "train.ref_logps.npy")
    assert ref.shape == (len(np.load(tmp_path / "dpo" / "data" / "train.tokens.npy")), 2) and (ref < 0).all()
    assert set(losses.DPO_METRICS) <= set(dpo_val) and 0 <= dpo_val["reward_accuracy"] <= 1

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\n/exit\n"))
    cli(["chat", "--run", str(tmp_path / "dpo"), "--max-new-tokens", "4", "--temperature", "0"])
    cli(["eval-chat", "--run", str(tmp_path / "dpo"), "--data", str(sft_data["test"]), "--limit", "6"])
    out = capsys.readouterr().out
    assert out.count("bot> ") == 1 and "on 6 questions" in out and "  all " in out
