import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_generals

from llm_jax.config import load_config
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.inference.generate import Generator, first_argmax, fit_prompt, sample_token, stream_text
from llm_jax.model.dense import matmul
from llm_jax.model.transformer import Transformer

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def _draw(n, temperature, top_k, top_p):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample_token(LOGITS, k, temperature, top_k, top_p)[0]))
    return np.bincount(np.asarray(draw(keys)), minlength=4) / n


def test_greedy_and_degenerate_filters_pick_the_argmax():
    assert _draw(100, 0.0, 0, 1.0).tolist() == [1, 0, 0, 0]
    assert _draw(100, 1.0, 1, 1.0).tolist() == [1, 0, 0, 0]
    assert _draw(100, 1.0, 0, 0.01).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("vocab", [16384, 1000])
def test_greedy_takes_the_first_of_tied_maxima_in_any_block(vocab):
    """first_argmax (blocks of 128, or jnp.argmax when the vocabulary is not a multiple) equals numpy's
    argmax: the first index of the largest value, ties across and inside blocks included."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[1, [700, 300, 301]] = 9.0  # tied in two blocks: the lowest index wins
    logits[2, [129, 130]] = 9.0  # tied inside one block
    logits[3, [vocab - 1]] = 9.0
    logits[4] = 0.0  # all tied
    got = jax.jit(first_argmax)(jnp.asarray(logits))
    assert got.tolist() == np.argmax(logits, axis=-1).tolist()
    assert got.tolist()[1:5] == [300, 129, vocab - 1, 0]
    logits[5, [900, 200]] = np.nan  # a broken row: some index in range (XLA:CPU's max may drop NaN)
    assert 0 <= int(jax.jit(first_argmax)(jnp.asarray(logits))[5]) < vocab


def test_a_one_row_bfloat16_matmul_on_cpu_keeps_the_weight_in_bfloat16():
    """One row (a prompt's last position, batch-1 decoding) through the LM head and a layer's matmul:
    the weight is not converted to float32 for a matrix-vector product (XLA:CPU's route for a one-row
    bfloat16 dot), and the row's result equals that of the same row in a batch of two."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 2048)), jnp.bfloat16)
    one = jax.jit(lambda x, w: matmul(x, w, 1, jnp.bfloat16))
    assert "f32[256,2048]" not in one.lower(x[:1], w).compile().as_text()
    np.testing.assert_array_equal(np.asarray(one(x[:1], w), np.float32), np.asarray(one(x, w)[:1], np.float32))


def test_sampling_follows_the_filtered_distribution():
    np.testing.assert_allclose(_draw(20000, 1.0, 0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(_draw(20000, 1.0, 2, 1.0), [0.625, 0.375, 0, 0], atol=0.015)
    # top_p 0.75: keep 0.5 and 0.3 (the token that crosses the mass is kept), renormalised.
    np.testing.assert_allclose(_draw(20000, 1.0, 0, 0.75), [0.625, 0.375, 0, 0], atol=0.015)
    # Low temperature sharpens: p ~ p^(1/T).
    sharp = np.array([0.5, 0.3, 0.15, 0.05]) ** 4
    np.testing.assert_allclose(_draw(20000, 0.25, 0, 1.0), sharp / sharp.sum(), atol=0.015)


def test_prompts_longer_than_the_context_keep_their_end():
    assert fit_prompt([1, 2, 3], seq_len=16, max_new_tokens=8) == ([1, 2, 3], 8, None)
    ids, new, note = fit_prompt(list(range(20)), seq_len=16, max_new_tokens=4)
    assert ids == list(range(8, 20)) and new == 4 and "kept its last 12" in note
    ids, new, note = fit_prompt([1, 2], seq_len=16, max_new_tokens=100)
    assert new == 15 and ids == [2] and "capped at 15" in note


def test_streamed_text_never_splits_a_character(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 7))) for _ in range(3000)]
    tok = train_tokenizer([" ".join(words)], 400, tmp_path / "t", 10**6, seed=0)
    text = "snow ☃ and 😀!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the emoji and snowman are byte pieces
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_cached_generation_equals_greedy_decoding_without_a_cache():
    cfg = load_config("tiny", ["model.seq_len=48"]).model
    model = Transformer(cfg)
    init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x, init(), is_leaf=lambda x: hasattr(x, "unbox")
    )
    # Larger weights make the greedy path depend on the prompt instead of collapsing to one token.
    params = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim > 1 else x, params)
    prompt = [3, 17, 99, 5, 250, 42, 7]
    got = list(Generator(cfg, params).stream(prompt, max_new_tokens=20, temperature=0.0))

    @jax.jit
    def next_token(tokens, length):  # tokens [1, 48] right-padded; causal, so padding is never seen
        hidden, _ = model.apply({"params": params}, tokens)
        logits = model.apply({"params": params}, hidden, method=Transformer.logits)
        return jnp.argmax(logits[0, length - 1])

    ids = list(prompt)
    for _ in range(20):
        ids.append(int(next_token(jnp.asarray([ids + [0] * (48 - len(ids))]), len(ids))))
    assert got == ids[len(prompt) :] and len(set(got)) > 3


def _dot_operand_dims(jaxpr) -> set[int]:
    """Every axis length of every dot_general operand in a jaxpr and its sub-jaxprs (scans, remat)."""
    return {d for eqn in dot_generals(jaxpr) for v in eqn.invars for d in v.aval.shape}


@pytest.mark.parametrize("serving", [True, False])
def test_a_prefill_from_a_known_position_attends_to_its_chunk_only_with_the_same_result(serving):
    """cache_index an int (generate's prefill): the attention reads the first cache_index + T slots, not
    the whole context (kv_cache.write_and_attend), in unrolled layers (serving on CPU) and in the layer
    scan (remat: the accelerators' serving path); a traced index reads them all. The same outputs and
    cache (to rounding: a layer's sums run over fewer masked zeros)."""
    from llm_jax.model.kv_cache import init_cache

    cfg = load_config("tiny", ["model.seq_len=256", "model.remat=dots"]).model  # 256: no other axis
    model = Transformer(cfg, serving=serving)
    assert model.unstacked == serving
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    cache = init_cache(cfg, 2, per_layer=serving)

    def prefill(index):
        first, cache1 = model.apply({"params": params}, tokens[:, :8], cache=cache, cache_index=index)
        second, cache2 = model.apply({"params": params}, tokens[:, 8:], cache=cache1, cache_index=index + 8)
        return jnp.concatenate([first, second], axis=1), cache2

    assert cfg.seq_len not in _dot_operand_dims(jax.make_jaxpr(lambda: prefill(0))().jaxpr)
    assert cfg.seq_len in _dot_operand_dims(jax.make_jaxpr(prefill)(jnp.asarray(0)).jaxpr)
    sliced, traced = jax.jit(lambda: prefill(0))(), jax.jit(prefill)(jnp.asarray(0))
    whole, _ = jax.jit(lambda: model.apply({"params": params}, tokens))()
    np.testing.assert_allclose(np.asarray(sliced[0]), np.asarray(traced[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sliced[0]), np.asarray(whole), atol=2e-5)
    for mine, theirs in zip(*(jax.tree_util.tree_leaves(c) for c in (sliced[1], traced[1]))):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-5)


@pytest.mark.slow
def test_generation_stops_at_a_stop_id():
    cfg = load_config("tiny", ["model.seq_len=32"]).model
    model = Transformer(cfg)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])()
    params = jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x, params, is_leaf=lambda x: hasattr(x, "unbox")
    )
    gen = Generator(cfg, params)
    free = list(gen.stream([1, 2, 3], 10, temperature=1.0, seed=3))
    stopped = list(gen.stream([1, 2, 3], 10, temperature=1.0, seed=3, stop_ids=(free[4],)))
    assert stopped == free[: free.index(free[4])]
    with pytest.raises(ValueError, match="use fit_prompt"):
        list(gen.stream(list(range(30)), 10))


# lengths 3, 21 and 9 (prompt buckets 16 and 32 alone, 32 together), greedy and sampled rows, each
# with its own budget, settings and seed: (prompt, max_new, temperature, top_k, top_p, seed)
ROWS = [
    ([5, 9, 7], 12, 0.0, 0, 1.0, 0),
    (list(range(3, 24)), 20, 1.0, 5, 0.9, 1),
    ([44, 2, 8, 31, 6, 6, 7, 100, 3], 7, 0.7, 0, 1.0, 2),
]


def _sharp_model():
    """The tiny model with random weights scaled up 8x, so that its distributions are far from flat."""
    cfg = load_config("tiny", ["model.seq_len=48"]).model
    model = Transformer(cfg)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32))["params"])()
    return cfg, jax.tree_util.tree_map(
        lambda x: x.unbox() * 8 if x.unbox().ndim > 1 else x.unbox(), params, is_leaf=lambda x: hasattr(x, "unbox")
    )


def _batched(gen, rows):
    out = [[] for _ in rows]
    for step in gen.stream_batch(*map(list, zip(*rows))):
        for r, tok in enumerate(step):
            if tok is not None:
                out[r].append(tok)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_rows_produce_exactly_what_each_prompt_produces_alone(dtype):
    """bfloat16: the weights cast once for inference (the KV cache stays float32 on CPU); decode steps
    come in chunks of up to DECODE_CHUNK (16), so the 20-token row spans two and the others end mid-chunk."""
    cfg, params = _sharp_model()
    gen = Generator(dataclasses.replace(cfg, dtype=dtype), params)
    alone = [list(gen.stream(p, n, t, k, q, s)) for p, n, t, k, q, s in ROWS]
    batched = _batched(gen, ROWS)
    assert batched == alone and [len(b) for b in batched] == [12, 20, 7]
    one_step = Generator(dataclasses.replace(cfg, dtype=dtype), params, chunk=1)
    assert _batched(one_step, ROWS) == batched  # the chunk is a dispatch detail, never a different token


def test_stop_strings_end_the_text_before_them_and_stop_drawing(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 5))) for _ in range(2000)]
    tok = train_tokenizer([" ".join(words)], 400, tmp_path / "t", 10**6, seed=0)
    ids = tok.encode("the cat sat. THE END and more")
    drawn = []

    def tokens():
        for i in ids:
            drawn.append(i)
            yield i

    text = "".join(stream_text(tok, tokens(), stop=("THE END", "never")))
    assert text == "the cat sat. " and len(drawn) < len(ids)
    assert "".join(stream_text(tok, iter(ids), stop=("absent",))) == "the cat sat. THE END and more"
    assert "".join(stream_text(tok, iter(ids), stop=("more",))) == "the cat sat. THE END and "


@pytest.mark.slow
def test_generation_on_a_mesh_splits_the_cache_and_matches_one_device():
    from llm_jax.config import MeshConfig
    from llm_jax.parallel.sharding import make_layout

    cfg, params = _sharp_model()
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
    one, mesh = Generator(cfg, params), Generator(cfg, params, layout)
    # serving on CPU: each layer's weights on their own (unstack_layers), split as the stacked ones were
    assert tuple(mesh.params["layer_0"]["wq"].sharding.spec) == ("fsdp", "tensor", None)
    # 3 rows: one idle row makes 4 batch shards
    steps = [list(gen.stream_batch(*map(list, zip(*ROWS)))) for gen in (one, mesh)]
    assert steps[0] == steps[1] and len(steps[0][0]) == 3
    with layout.activate():
        _, cache = mesh._prefill(
            mesh.params,
            jnp.zeros((4, 16), jnp.int32),
            jnp.full((4,), 3),
            jnp.zeros(4, jnp.uint32),
            (jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4)),
        )
    # each layer's keys [batch, kv_heads, seq_len, head_dim]: rows over data x fsdp, kv heads over tensor
    assert {s.data.shape for s in cache[0]["k"].addressable_shards} == {(1, 1, 48, 16)}
    assert {s.data.shape for s in cache[0]["v"].addressable_shards} == {(1, 1, 16, 48)}  # values: transposed
