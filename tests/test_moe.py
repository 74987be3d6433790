"""Mixture of experts (model/moe.py): routing equals a direct computation, the capacity path drops what it
should, the balance loss evens a skewed router, expert parallelism trains like one device."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig, load_config
from llm_jax.config.rules import rules_table
from llm_jax.errors import UserError
from llm_jax.model import moe
from llm_jax.model.transformer import Transformer, flops_per_token, unstack_layers
from llm_jax.parallel import sharding
from llm_jax.tools.plan import param_bytes
from llm_jax.tools.sweep import run_sweep
from llm_jax.train import losses
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

MOE = ["model.dtype=float32", "model.moe.experts=4", "model.moe.top_k=2"]


class _Experts(nn.Module):
    """The routed experts of one layer, as a Block calls them."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, y):
        return moe.moe_mlp(self, y, self.cfg.init_std)


def _model(*overrides) -> ModelConfig:
    return load_config("tiny", MOE + list(overrides)).model


def _direct(params: dict, y: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Every expert on every token, then each token's chosen experts picked and weighted: no sorting, no blocks."""
    logits = jnp.einsum("btd,de->bte", y, params["router"])
    _, weights, experts = moe.route(logits, cfg.moe.top_k, cfg.moe.router)
    gate = jnp.einsum("btd,edf->btef", y, params["moe_gate"])
    up = jnp.einsum("btd,edf->btef", y, params["moe_up"])
    every = jnp.einsum("btef,efd->bted", jax.nn.silu(gate) * up, params["moe_down"])  # [B, T, E, D]
    chosen = jnp.take_along_axis(every, experts[..., None], axis=2)  # [B, T, k, D]
    return jnp.sum(chosen * weights[..., None], axis=2)


def _init(cfg: ModelConfig, shape=(2, 64)):
    y = jax.random.normal(jax.random.PRNGKey(1), (*shape, cfg.d_model))
    params = nn.meta.unbox(_Experts(cfg).init(jax.random.PRNGKey(0), y)["params"])
    return params, y


@pytest.mark.parametrize("experts,top_k,router", [(4, 2, "softmax"), (8, 3, "sigmoid")])
def test_dropless_routing_equals_the_direct_computation_forward_and_gradients(experts, top_k, router):
    cfg = _model(f"model.moe.experts={experts}", f"model.moe.top_k={top_k}", f"model.moe.router={router}")
    params, y = _init(cfg)
    assert moe.block_rows(y.shape[0] * y.shape[1] * top_k, experts) < 64  # several blocks per expert, padding
    ours = lambda p, y: _Experts(cfg).apply({"params": p}, y)[0]  # noqa: E731
    direct = lambda p, y: _direct(p, y, cfg)  # noqa: E731
    np.testing.assert_allclose(ours(params, y), direct(params, y), atol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    grads = [
        jax.grad(lambda p, y, f=f: jnp.sum(f(p, y) * cotangent), argnums=(0, 1))(params, y) for f in (ours, direct)
    ]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_block_matmul_equals_ragged_dot_on_the_padded_layout():
    """On CPU the grouped matmul loops over blocks; accelerators run jax.lax.ragged_dot on the same layout."""
    key = jnp.asarray(np.random.default_rng(0).integers(0, 5, 300), jnp.int32)  # 4 experts + 4: not this device's
    dest, block_expert, sizes = moe._block_layout(key, 4, 16)
    assert int(jnp.sum(dest < block_expert.shape[0] * 16)) == int(jnp.sum(key < 4))
    x = jax.random.normal(jax.random.PRNGKey(0), (block_expert.shape[0] * 16, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 6))
    ragged = jax.lax.ragged_dot(x, w, sizes)
    np.testing.assert_allclose(moe._block_matmul(x, w, block_expert), ragged, atol=1e-5)
    dx, dw = jax.grad(lambda x, w: jnp.sum(moe._block_matmul(x, w, block_expert) ** 2), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) ** 2), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, rx, atol=1e-4)
    np.testing.assert_allclose(dw, rw, atol=1e-4)


def _queues(experts: np.ndarray, n_experts: int, capacity: int) -> np.ndarray:
    """Per sequence, copies in token order join their expert's queue while it has room: kept [B, T, k]."""
    kept = np.zeros(experts.shape, bool)
    for b in range(experts.shape[0]):
        taken = np.zeros(n_experts, int)
        for t in range(experts.shape[1]):
            for j, e in enumerate(experts[b, t]):
                kept[b, t, j] = taken[e] < capacity
                taken[e] += 1
    return kept


def test_capacity_path_drops_what_the_queues_overflow_and_equals_dropless_with_room():
    roomy = _model("model.moe.capacity_factor=4")  # C = seq_len x k: no queue can overflow
    params, y = _init(roomy)
    out, stats = _Experts(roomy).apply({"params": params}, y)
    assert float(stats["dropped"]) == 0.0
    np.testing.assert_allclose(out, _direct(params, y, roomy), atol=1e-5)

    tight = _model("model.moe.capacity_factor=0.5")
    out, stats = _Experts(tight).apply({"params": params}, y)
    capacity = moe.capacity_of(tight, y.shape[1])  # ceil(0.5 x 64 x 2 / 4) = 16 of each expert's ~32 copies
    logits = jnp.einsum("btd,de->bte", y, params["router"])
    _, weights, experts = moe.route(logits, 2, "softmax")
    kept = _queues(np.asarray(experts), 4, capacity)
    assert float(stats["dropped"]) == pytest.approx(1 - kept.mean()) and 0.2 < float(stats["dropped"]) < 0.6
    kept_weights = jnp.where(kept, weights, 0.0)
    gate = jnp.einsum("btd,edf->btef", y, params["moe_gate"])
    up = jnp.einsum("btd,edf->btef", y, params["moe_up"])
    every = jnp.einsum("btef,efd->bted", jax.nn.silu(gate) * up, params["moe_down"])
    chosen = jnp.take_along_axis(every, experts[..., None], axis=2)
    np.testing.assert_allclose(out, jnp.sum(chosen * kept_weights[..., None], axis=2), atol=1e-5)


def test_balance_loss_evens_a_skewed_router():
    """Only the router trains, on the balance loss alone: expert 0 starts with ~3/4 of the copies."""
    d, n_experts, top_k = 32, 8, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (4096, d))
    router = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (d, n_experts))
    bias = jnp.zeros(n_experts).at[0].set(3.0)  # a skew in the logits every token sees

    def cv(r):
        _, _, experts = moe.route(x @ r + bias, top_k, "softmax")
        load = moe.expert_load(experts, n_experts)
        return float(jnp.std(load) / jnp.mean(load)), float(load[0] / jnp.sum(load))

    def loss(r):
        scores, _, experts = moe.route(x @ r + bias, top_k, "softmax")
        return moe.balance_loss(scores, experts)

    before, share0 = cv(router)
    step = jax.jit(lambda r: r - 0.5 * jax.grad(loss)(r))
    for _ in range(300):
        router = step(router)
    after, _ = cv(router)
    assert before > 0.9 and share0 > 0.45  # skewed: expert 0 takes about half the copies (top-2)
    assert after < 0.25, (before, after)


def test_bias_balancing_evens_a_skewed_router_without_a_loss_or_a_gradient():
    """DeepSeek-V3's auxiliary-loss-free balancing (model.moe.bias_update) on the skewed router above: the biases
    alone (the router never changes) take the load CV from ~1.1 to under 0.05; the weights stay the scores."""
    cfg = load_config("tiny", ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.bias_update=0.001"]).model
    x = jax.random.normal(jax.random.PRNGKey(0), (4096, 32))
    logits = x @ (0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 8))) + jnp.zeros(8).at[0].set(3.0)

    @jax.jit
    def step(params, _):
        _, _, experts = moe.route(logits, 2, "softmax", True, params["layers"]["router_bias"][0])
        load = moe.expert_load(experts, 8)
        return moe.update_router_bias(cfg, params, load[None]), jnp.std(load) / jnp.mean(load)

    params, cvs = jax.lax.scan(step, {"layers": {"router_bias": jnp.zeros((1, 8))}}, None, length=600)
    assert cvs[0] > 1.0 and cvs[-1] < 0.05, (cvs[0], cvs[-1])
    bias = params["layers"]["router_bias"][0]
    scores, weights, experts = moe.route(logits, 2, "softmax", True, bias)
    chosen = jnp.take_along_axis(scores, experts, axis=-1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    assert float(bias[0]) < -0.3 < 0.3 < float(bias[1:].min())  # down for the crowded expert, up for the rest


def test_a_train_step_moves_each_router_bias_by_the_update_toward_its_layers_mean_load():
    cfg = load_config("tiny", MOE + ["model.moe.experts=8", "model.moe.bias_update=0.01", "train.batch_size=8"])
    layout = sharding.make_layout(cfg.mesh, jax.devices()[:1])
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1), dtype=np.int32)
    state, metrics = steps.train(steps.init(jax.random.PRNGKey(0)), layout.put_batch({"tokens": tokens}))
    share = np.array([[float(metrics[f"moe/layer{i}/expert{e}"]) for e in range(8)] for i in range(2)])
    want = 0.01 * np.sign(1 / 8 - share)  # no gradient reaches it: AdamW leaves it where the update puts it
    np.testing.assert_allclose(np.asarray(state.params["layers"]["router_bias"]), want, atol=1e-7)


def test_capacity_slots_are_causal_and_count_in_token_order():
    experts = jnp.asarray([[[0, 1], [0, 2], [0, 1], [3, 0]]], jnp.int32)
    np.testing.assert_array_equal(moe.capacity_slots(experts, 4, 2), [[[0, 0], [1, 0], [-1, 1], [0, -1]]])


def test_serving_layers_unstacked_equal_the_scan_with_moe_every_other_layer():
    cfg = _model("model.n_layers=4", "model.moe.every=2", "model.moe.shared_experts=1")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    assert set(params["layers"]) == {"block_0", "block_1"} and "router" in params["layers"]["block_1"]
    assert "router" not in params["layers"]["block_0"]
    scanned, _ = Transformer(cfg).apply({"params": params}, tokens)
    unstacked, _ = Transformer(cfg, serving=True).apply({"params": unstack_layers(params)}, tokens)
    np.testing.assert_allclose(unstacked, scanned, atol=1e-5)


def test_flops_per_token_count_active_experts_only():
    dense, sparse = _model("model.moe.experts=0"), _model("model.moe.experts=8", "model.moe.top_k=1")
    d, f, layers = dense.d_model, dense.mlp_dim, dense.n_layers
    assert flops_per_token(sparse) - flops_per_token(dense) == 6 * layers * d * 8  # the routers
    shared = _model("model.moe.experts=8", "model.moe.top_k=2", "model.moe.shared_experts=1")
    assert flops_per_token(shared) - flops_per_token(sparse) == 6 * layers * 2 * 3 * d * f


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.moe.top_k=5"], "model.moe.top_k=5 must be between 1 and model.moe.experts=4"),
        (["mesh.expert=3"], "model.moe.experts=4 do not split evenly over mesh.expert=3 devices"),
        (["model.moe.experts=0", "mesh.expert=2"], "mesh.expert=2 splits experts, but model.moe.experts=0"),
        (["model.moe.every=3"], "model.moe.every=3 must be positive and divide model.n_layers=2"),
        (["model.moe.router=relu"], "model.moe.router='relu' must be softmax or sigmoid"),
        (
            ["model.moe.every=2", "mesh.pipeline=2"],
            "model.n_layers=2 must be a multiple of every x mesh.pipeline x mesh.pipeline_repeats",
        ),
        (["model.quant=int8"], "model.quant=int8 does not take MoE weights yet"),
        (
            ["model.moe.bias_update=0.001", "mesh.pipeline=2", "mesh.pipeline_repeats=2", "model.n_layers=4"],
            "model.moe.bias_update=0.001 must be >= 0, and 0 in a circular pipeline",
        ),
        (
            ["model.moe.shared_gate=true"],
            "model.moe.shared_gate gates the shared experts, but model.moe.shared_experts=0",
        ),
        (
            ["model.moe.experts=0", "model.moe.bias_update=0.001"],
            "model.moe.bias_update, shared_experts and shared_gate act beside routed experts, but model.moe.experts=0",
        ),
        (
            ["model.moe.experts=0", "model.moe.shared_experts=1"],
            "model.moe.bias_update, shared_experts and shared_gate act beside routed experts, but model.moe.experts=0",
        ),
    ],
)
def test_bad_moe_settings_get_one_line_each(overrides, message):
    with pytest.raises(UserError) as error:
        load_config("tiny", MOE + overrides)
    assert message in str(error.value)


# Expert parallelism: the same 3 AdamW steps as one device (float32), over the expert axis alone and with
# data, fsdp and tensor; the tokens reach their experts by all-gather + reduce-scatter inside a shard_map.
EP = MOE + ["model.moe.experts=8", "model.n_kv_heads=4", "train.batch_size=8", "optim.warmup_steps=1", "optim.lr=1e-4"]


def _train(overrides, devices):
    cfg = load_config("tiny", EP + overrides)
    layout = sharding.make_layout(cfg.mesh, devices)
    layout.check(cfg)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps))
    state, history = steps.init(jax.random.PRNGKey(0)), []
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1), dtype=np.int32)
    for _ in range(3):
        state, metrics = steps.train(state, layout.put_batch({"tokens": tokens}))
        history.append([float(metrics[k]) for k in ("loss", "grad_norm", "moe_aux", "moe_load_cv")])
    return history, state, steps


CAPACITY = ["model.moe.capacity_factor=1.0", "model.moe.every=2", "model.n_layers=4", "model.moe.shared_experts=1"]


@pytest.fixture(scope="module")
def one_device():
    """The one-device run of each variant, made once when a test first asks for it."""
    runs = {}
    return lambda variant: runs.setdefault(tuple(variant), _train(variant, jax.devices()[:1]))


MESHES = {
    "ep2_data4": ["mesh.expert=2", "mesh.data=4"],
    "ep8": ["mesh.expert=8", "mesh.data=1"],
    "ep4_fsdp2": ["mesh.expert=4", "mesh.fsdp=2", "mesh.data=1", "mesh.rules=fsdp"],
    "ep2_tp2_data2": ["mesh.expert=2", "mesh.tensor=2", "mesh.data=2", "mesh.rules=fsdp_tp"],
    "ep2_context2_data2": ["mesh.expert=2", "mesh.context=2", "mesh.data=2"],
}
CASES = [("dropless", mesh) for mesh in MESHES] + [
    ("capacity_every2_shared", "ep8"),
    ("capacity_every2_shared", "ep4_fsdp2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant,mesh", CASES)
def test_expert_parallel_trains_like_one_device(one_device, variant, mesh):
    variant = CAPACITY if variant != "dropless" else []
    history, state, _ = one_device(variant)
    got, got_state, steps = _train(variant + MESHES[mesh], jax.devices())
    np.testing.assert_allclose(got, history, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got_state.params), jax.tree_util.tree_leaves(state.params)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    hlo = steps.compile_train().as_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo
    layers = got_state.params["layers"]
    expert_gate = layers.get("block_1", layers)["moe_gate"]  # [layers, E, D, F]: E split over the expert axis
    assert expert_gate.addressable_shards[0].data.shape[1] == 8 // steps.layout.mesh.shape["expert"]


# A pipeline of M micro-batches runs the rows train.grad_accum = M gives each accumulation step, and takes each
# micro-batch's balance loss: the same steps as one device accumulating over M (the load CV, of the whole batch
# under the pipeline and averaged over accumulation steps without, is compared per layer loads instead).
PIPELINES = {
    "pp2_data4": ["mesh.pipeline=2", "mesh.data=4"],
    "pp2_ep2_data2": ["mesh.pipeline=2", "mesh.expert=2", "mesh.data=2"],
    "pp2_circular_data4": ["mesh.pipeline=2", "mesh.pipeline_repeats=2", "mesh.data=4", "model.n_layers=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,mesh", [("dropless", m) for m in PIPELINES] + [("capacity_every2_shared", "pp2_data4")]
)
def test_moe_in_a_pipeline_trains_like_one_device_accumulating_its_micro_batches(one_device, variant, mesh):
    variant = (CAPACITY if variant != "dropless" else []) + ["train.grad_accum=2"]
    extra = [o for o in PIPELINES[mesh] if o.startswith("model.")]
    history, state, _ = one_device(variant + extra)
    got, got_state, steps = _train(variant + PIPELINES[mesh] + ["train.grad_accum=1", "mesh.microbatches=2"], None)
    np.testing.assert_allclose(np.asarray(got)[:, :3], np.asarray(history)[:, :3], rtol=1e-5, atol=1e-5)
    params = steps.to_layer_order(got_state).params  # a circular pipeline keeps its layers in stage order
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert "collective-permute" in steps.compile_train().as_text()


def test_sweep_and_plan_take_the_expert_axis():
    cfg = load_config("tiny", EP)
    rows = run_sweep(cfg, [(4, 1, 1, 1, 0, 1, 1, 2)], [8], 1, log=lambda *_: None)
    assert rows[0]["mesh"] == "4x1x1 e2" and rows[0]["error"] == "" and float(rows[0]["tokens_per_s"]) > 0
    mixtral, rules = load_config("mixtral-8x7b").model, rules_table("fsdp")
    expert_params = mixtral.n_layers * 3 * mixtral.d_model * mixtral.mlp_dim * mixtral.moe.experts  # 45.1B of 46.7B
    whole, split = (param_bytes(mixtral, {"fsdp": 8, "expert": e}, rules) for e in (1, 8))
    assert whole - split == 4 * expert_params // 8 * 7 // 8  # the experts' fsdp shards, split 8 ways more


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_one_expert_is_the_dense_mlp_loss_and_gradients(dtype, tolerance):
    """The MoE path with E = top_k = 1 (router weight 1) against the dense model with the same matrices: the
    whole train loss's gradients, relative norm of the difference per leaf (bfloat16: its rounding, not the
    zeros a gradient lost on the way would give)."""
    shape = ["model.vocab_size=512", "model.n_kv_heads=1", f"model.dtype={dtype}", "model.moe.aux_loss=0"]
    dense = load_config("tiny", shape + ["model.moe.z_loss=0"]).model
    one = load_config("tiny", shape + ["model.moe.z_loss=0", "model.moe.experts=1", "model.moe.top_k=1"]).model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 33)), jnp.int32)
    params = nn.meta.unbox(Transformer(dense).init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])
    layers = {k: v for k, v in params["layers"].items() if not k.startswith("w_")} | {
        "moe_gate": params["layers"]["w_gate"][:, None],
        "moe_up": params["layers"]["w_up"][:, None],
        "moe_down": params["layers"]["w_down"][:, None],
        "router": jnp.zeros((dense.n_layers, dense.d_model, 1)),
    }
    as_moe = {**params, "layers": layers}
    loss = lambda cfg, p: losses.lm_sums(Transformer(cfg, True), p, {"tokens": tokens})[0]  # noqa: E731
    (want, grads), (got, moe_grads) = (
        jax.value_and_grad(lambda p, c=c: loss(c, p))(p) for c, p in ((dense, params), (one, as_moe))
    )
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    pairs = [(grads["embedding"], moe_grads["embedding"])]
    pairs += [(grads["layers"][k], moe_grads["layers"][k]) for k in ("wq", "wo", "attn_norm", "mlp_norm")]
    pairs += [(grads["layers"][f"w_{k}"], moe_grads["layers"][f"moe_{k}"][:, 0]) for k in ("gate", "up", "down")]
    for a, b in pairs:
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < tolerance
