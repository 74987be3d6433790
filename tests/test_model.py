import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.model.block import apply_rope, rope_tables
from llm_jax.model.kv_cache import init_cache
from llm_jax.model.transformer import Transformer


def _init(model):
    init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x, init(), is_leaf=lambda x: hasattr(x, "unbox")
    )


def _model(*overrides):
    cfg = load_config("tiny", ["model.seq_len=32", *overrides]).model
    model = Transformer(cfg)
    params = _init(model)
    # Random norm scales too, so tests do not rely on the all-ones init.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, model, params


def _logits(model, params, tokens, **kw):
    return _jitted_logits(model)(params, tokens, **kw)


_CACHE = {}


def _jitted_logits(model):
    """One compiled forward per (model, shapes): eager op-by-op dispatch would dominate test time."""
    if model not in _CACHE:

        def forward(params, tokens, cache=None, cache_index=0):
            hidden, cache = model.apply({"params": params}, tokens, cache=cache, cache_index=cache_index)
            return model.apply({"params": params}, hidden, method=Transformer.logits), cache

        _CACHE[model] = jax.jit(forward)
    return _CACHE[model]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.slow
def test_changing_a_future_token_leaves_earlier_logits_unchanged(kv_heads):
    cfg, model, params = _model(f"model.n_kv_heads={kv_heads}")
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, cfg.vocab_size)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size)
    a, _ = _logits(model, params, tokens)
    b, _ = _logits(model, params, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 16))

    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), 16, 10000.0)
        ck, sk = rope_tables(jnp.array([[pk]]), 16, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(5, 5) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)  # offset 0: no rotation
    assert abs(score(7, 3) - score(7, 4)) > 1e-3
    # Rotation preserves norms.
    c, s = rope_tables(jnp.array([[42]]), 16, 10000.0)
    assert float(jnp.linalg.norm(apply_rope(q, c, s))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_kv_cache_decode_matches_the_full_forward(kv_heads):
    cfg, model, params = _model(f"model.n_kv_heads={kv_heads}")
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 20), 0, cfg.vocab_size)
    full, _ = _logits(model, params, tokens)
    # Prefill 12 tokens, then decode the remaining 8 one at a time.
    logits, cache = _logits(model, params, tokens[:, :12], cache=init_cache(cfg, 2))
    steps = [logits]
    for i in range(12, 20):
        logits, cache = _logits(model, params, tokens[:, i : i + 1], cache=cache, cache_index=i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
    assert cache["k"].shape == (cfg.n_layers, 2, kv_heads, cfg.seq_len, cfg.head_dim)
    assert cache["v"].shape == (cfg.n_layers, 2, kv_heads, cfg.head_dim, cfg.seq_len)  # values: transposed


def test_untied_head_and_bf16_compute():
    cfg, model, params = _model("model.tie_embeddings=false", "model.dtype=bfloat16")
    assert params["lm_head"].shape == (cfg.vocab_size, cfg.d_model) and params["lm_head"].dtype == jnp.float32
    tokens = jnp.arange(16)[None] % cfg.vocab_size
    logits, _ = _logits(model, params, tokens)
    assert logits.dtype == jnp.float32
    ref, _ = _logits(Transformer(cfg.__class__(**{**cfg.__dict__, "dtype": "float32"})), params, tokens)
    assert float(jnp.abs(logits - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_parameters_carry_logical_axis_names():
    cfg = load_config("tiny").model
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    names = {
        "/".join(k.key for k in path): leaf.names
        for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: hasattr(x, "names"))[0]
    }
    assert names["embedding"] == ("vocab", "embed")
    assert names["layers/wq"] == ("layers", "embed", "heads", "head_dim")
    assert names["layers/wk"] == ("layers", "embed", "kv_heads", "head_dim")
    assert names["layers/w_down"] == ("layers", "mlp", "embed")


def test_init_scales_residual_projections():
    cfg, model, _ = _model()
    params = _init(model)
    assert float(jnp.std(params["layers"]["wq"])) == pytest.approx(0.02, rel=0.1)
    assert float(jnp.std(params["layers"]["wo"])) == pytest.approx(0.02 / np.sqrt(2 * cfg.n_layers), rel=0.1)
    assert float(jnp.std(params["layers"]["w_down"])) == pytest.approx(0.02 / np.sqrt(2 * cfg.n_layers), rel=0.1)
    assert (params["final_norm"] == 1).all()


# 2 / 4 / 1 query blocks; MHA/GQA/MQA; with and without packed segments. splash (the TPU Pallas
# kernel) runs in interpret mode here, on sequences that are multiples of 128.
@pytest.mark.parametrize("t, kv_heads, packed", [(128, 4, False), (256, 2, True), (100, 1, False), (128, 1, True)])
def test_attention_kernels_compute_the_same_function(t, kv_heads, packed):
    from llm_jax.model.attention import causal_attention

    keys = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(keys[0], (2, t, 4, 16))
    k, v = (jax.random.normal(key, (2, t, kv_heads, 16)) for key in keys[1:])
    segments = (
        jnp.asarray(np.repeat([[0, 1, 2]], 2, axis=0).repeat([t // 3, t // 2, t - t // 3 - t // 2], axis=1))
        if packed
        else None
    )
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, impl, segments)))  # noqa: E731
    impls = ("xla", "blocked") + (("splash",) if t % 128 == 0 else ())
    (a, grads_a), *others = [jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in impls]
    for b, grads_b in others:
        assert float(a) == pytest.approx(float(b), rel=1e-5)
        for ga, gb in zip(grads_a, grads_b):
            np.testing.assert_allclose(ga, gb, atol=1e-5)


def test_splash_attention_under_a_mesh_runs_per_device_and_matches():
    from llm_jax.config import MeshConfig
    from llm_jax.model.attention import causal_attention
    from llm_jax.parallel.sharding import make_layout

    layout = make_layout(
        MeshConfig(
            data=2,
            pipeline=1,
            fsdp=2,
            expert=1,
            context=1,
            tensor=2,
            dcn_data=1,
            rules="fsdp_tp",
            microbatches=0,
            pipeline_repeats=1,
        ),
        jax.devices()[:8],
    )
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(keys[0], (4, 128, 4, 16))
    k, v = (jax.random.normal(key, (4, 128, 2, 16)) for key in keys[1:])
    segments = jnp.asarray(np.repeat([[0] * 50 + [1] * 78], 4, axis=0))
    want = causal_attention(q, k, v, "xla", segments)
    with layout.activate():
        q_s, kv_s = (
            layout.sharding(("batch", "length", "heads", "head_dim")),
            layout.sharding(("batch", "length", "kv_heads", "head_dim")),
        )
        args = jax.device_put((q, k, v), (q_s, kv_s, kv_s))
        got = jax.jit(lambda q, k, v: causal_attention(q, k, v, "splash", segments))(*args)
    np.testing.assert_allclose(got, want, atol=1e-5)


# rows (accelerators) and vocab tiles (CPU; vocab 1000 takes a padded last tile), in float32 and
# bfloat16 (the tiles keep their exps in the compute dtype)
@pytest.mark.parametrize(
    "schedule, chunk, dtype",
    [("rows", None, "float32"), ("rows", 64, "float32"), ("tiles", None, "float32"), ("tiles", 128, "float32")]
    + [("tiles", None, "bfloat16"), ("tiles", 128, "bfloat16")],
)
def test_chunked_cross_entropy_matches_full_logits(schedule, chunk, dtype):
    import optax

    from llm_jax.model.loss import cross_entropy_sum

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    h, table = jax.random.normal(keys[0], (512, 32)), 0.3 * jax.random.normal(keys[1], (1000, 32))
    targets = jax.random.randint(keys[2], (512,), 0, 1000)
    weights = (jax.random.uniform(keys[3], (512,)) > 0.3).astype(jnp.float32)
    if dtype == "bfloat16":  # the reference sees the inputs the bf16 matmuls see
        h, table = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (h, table))

    def ref(h, table):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(h @ table.T, targets) * weights)

    def ours(h, table):
        return cross_entropy_sum(h, table, targets, weights, jnp.dtype(dtype), chunk, schedule)[0]

    assert float(jax.jit(ours)(h, table)) == pytest.approx(
        float(ref(h, table)), rel=1e-6 if dtype == "float32" else 1e-5
    )
    for a, b in zip(jax.grad(ref, argnums=(0, 1))(h, table), jax.jit(jax.grad(ours, argnums=(0, 1)))(h, table)):
        if dtype == "float32":
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:  # exps and d logits rounded to 8 significant bits (2^-9 relative) before the matmuls
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 5e-3


@pytest.mark.parametrize("schedule", ["rows", "tiles"])
def test_z_loss_adds_its_term_and_its_gradient(schedule):
    from llm_jax.model.loss import cross_entropy_sum

    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    h, table = jax.random.normal(keys[0], (256, 32)), 0.5 * jax.random.normal(keys[1], (1000, 32))
    targets = jax.random.randint(keys[2], (256,), 0, 1000)
    weights = (jax.random.uniform(keys[3], (256,)) > 0.3).astype(jnp.float32)
    z = 1e-2

    def ref(h, table):  # PaLM: nll + z * log(Z)^2 per target
        logits = h @ table.T
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
        return jnp.sum((nll + z * lse**2) * weights), jnp.sum(z * lse**2 * weights)

    def ours(h, table):
        return cross_entropy_sum(h, table, targets, weights, jnp.float32, None, schedule, z_loss=z)

    (loss, z_part), (want_loss, want_z) = jax.jit(ours)(h, table), ref(h, table)
    assert float(z_part) > 0.01 * float(loss)  # the term is there, and reported on its own
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    assert float(z_part) == pytest.approx(float(want_z), rel=1e-6)
    grads = jax.jit(jax.grad(lambda h, t: ours(h, t)[0], argnums=(0, 1)))(h, table)
    for a, b in zip(grads, jax.grad(lambda h, t: ref(h, t)[0], argnums=(0, 1))(h, table)):
        np.testing.assert_allclose(a, b, atol=1e-5)
