"""Continuous batching over the paged KV cache (llm_jax/inference/engine.py, paged.py), in process."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import ROWS, _sharp_model

from llm_jax.inference.engine import Engine, Request
from llm_jax.inference.generate import Generator
from llm_jax.inference.paged import PagedModel
from llm_jax.model.transformer import Transformer

ENGINES = []


def _engine(cfg, params, rows=4, blocks=None, block=8, chunk=16, layout=None, static=False, rides=0, share=True):
    blocks = blocks or rows * cfg.seq_len // block
    model = PagedModel(cfg, params, layout, rows, blocks + 1, block, chunk, rides)
    ENGINES.append(Engine(model, (), 64, static, share))
    return ENGINES[-1]


@pytest.fixture(autouse=True)
def _close_engines():
    yield
    while ENGINES:  # an engine thread must not be inside XLA when the interpreter exits
        ENGINES.pop().close()


def _request(row, **kw):
    prompt, n, t, k, p, seed = row
    return Request(list(prompt), n, t, k, p, seed, **kw)


def _wait(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.002)
    assert condition()


@pytest.fixture(scope="module")
def model():
    return _sharp_model()  # seq_len 48


@pytest.mark.parametrize("dtype,rides", [("float32", 0), ("bfloat16", 0), ("float32", 24)])
def test_requests_get_exactly_what_they_get_alone_whenever_they_arrive(model, dtype, rides):
    """Greedy and sampled rows, arriving together and while others decode, prompts longer than the
    prefill chunk (21 tokens in chunks of 16) and more requests than rows: each request's tokens equal
    the Generator's for its prompt alone. With rides: prompts of up to 24 tokens a step ride in the
    decode steps (the 21-token one alone, the short ones together), the rest are prefilled apart."""
    cfg, params = model
    cfg = dataclasses.replace(cfg, dtype=dtype)
    gen = Generator(cfg, params)
    rows = ROWS * 3  # 9 requests, 4 rows
    alone = [list(gen.stream(p, n, t, k, q, s)) for p, n, t, k, q, s in rows]
    engine = _engine(cfg, params, rides=rides)
    calls = {"prefill": 0, "ride": 0}
    for name in calls:  # count the model's calls of each kind
        step = getattr(engine.model, name)
        setattr(
            engine.model, name, lambda *a, _step=step, _name=name: calls.update({_name: calls[_name] + 1}) or _step(*a)
        )
    early = [engine.submit(_request(r)) for r in rows[:5]]
    _wait(lambda: early[1].generated > 0)  # the long-prompt request is decoding when the rest arrive
    late = [engine.submit(_request(r)) for r in rows[5:]]
    got = [list(r.tokens()) for r in early + late]
    assert got == alone and [len(g) for g in got] == [12, 20, 7] * 3
    assert (calls["ride"] > 0) == (rides > 0) and (calls["prefill"] > 0 or rides), calls
    assert all(r.finish_reason == "length" for r in early + late)
    assert engine.load()["kv_blocks_used"] == 0 and engine.model.pool.free == engine.model.pool.total


def test_a_request_joins_the_running_batch_instead_of_waiting_for_it(model):
    """Continuous: a short request submitted while a long one decodes ends before the long one does;
    static: it waits for the whole batch."""
    cfg, params = model
    order = {}
    for static in (False, True):
        engine = _engine(cfg, params, static=static)
        long = engine.submit(Request([5, 9, 7], 40, 0.0, 0, 1.0, 0))
        _wait(lambda r=long: r.generated > 0)
        short = engine.submit(Request([8, 8], 2, 0.0, 0, 1.0, 0))
        list(short.tokens())
        order[static] = long.generated  # how far the long request had got when the short one ended
        assert len(list(long.tokens())) == 40
    assert order[False] < 40 and order[True] == 40, order


def test_when_kv_blocks_run_out_requests_wait_and_all_finish(model):
    """A pool of 12 blocks of 8 positions holds two requests of 40 positions (5 blocks each) at a time:
    the third waits for blocks, then runs; nothing fails, every block comes back."""
    cfg, params = model
    engine = _engine(cfg, params, rows=4, blocks=12)
    prompt = list(range(3, 11))
    requests = [engine.submit(Request(prompt, 32, 0.0, 0, 1.0, 0)) for _ in range(3)]
    seen = 0
    deadline = time.time() + 120
    while any(r.finish_reason is None for r in requests) and time.time() < deadline:
        load = engine.load()
        assert load["kv_blocks_used"] <= 10
        seen = max(seen, load["waiting"])
        time.sleep(0.005)
    outs = [list(r.tokens()) for r in requests]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 32
    assert engine.model.pool.free == 12
    assert seen >= 1  # the third request waited for blocks
    with pytest.raises(ValueError, match="needs 6 KV blocks of 8 tokens; this server has 5"):
        _engine(cfg, params, rows=2, blocks=5).submit(Request(list(range(40)), 8, 0.0, 0, 1.0, 0))


def test_log_probs_equal_the_model_scoring_the_text_directly(model):
    """Prompt log-probs (echo) and new tokens' log-probs and top alternatives equal log_softmax of a
    plain forward pass over prompt + completion, to 1e-4 in float32."""
    cfg, params = model
    engine = _engine(cfg, params, chunk=16)
    prompt = list(range(3, 24))  # 21 tokens: two prefill chunks
    r = engine.submit(Request(prompt, 6, 0.0, 0, 1.0, 0, logprobs=True, prompt_logprobs=True))
    new = list(r.tokens())
    ids = prompt + new
    net = Transformer(cfg)
    hidden, _ = net.apply({"params": params}, jnp.asarray([ids]))
    logps = np.asarray(jax.nn.log_softmax(net.apply({"params": params}, hidden, method=Transformer.logits)[0]))
    want_prompt = [logps[i, ids[i + 1]] for i in range(len(prompt) - 1)]
    np.testing.assert_allclose([lp for lp, _ in r.prompt_scores], want_prompt, atol=1e-4)
    want_new = [logps[len(prompt) - 1 + i, t] for i, t in enumerate(new)]
    np.testing.assert_allclose([lp for lp, _ in r.scores], want_new, atol=1e-4)
    top = r.scores[2][1]
    row = logps[len(prompt) + 1]
    assert [t for t, _ in top[:5]] == np.argsort(-row)[:5].tolist()
    np.testing.assert_allclose([v for _, v in top[:5]], np.sort(row)[::-1][:5], atol=1e-4)
    assert top[0][0] == new[2]  # greedy: the sampled token is the most likely one
    echo_only = engine.submit(Request(prompt, 0, 0.0, 0, 1.0, 0, logprobs=True, prompt_logprobs=True))
    assert list(echo_only.tokens()) == [] and echo_only.finish_reason == "length"
    np.testing.assert_allclose([lp for lp, _ in echo_only.prompt_scores], want_prompt, atol=1e-4)
    assert engine.stats["shared_tokens"] == 0  # a prompt scored for echo is prefilled whole


@pytest.mark.slow
def test_continuous_batching_on_a_mesh_matches_one_device(model):
    """Rows over data 2, kv heads over tensor 2: the block pool split over data by blocks (each shard its
    own, for the rows it holds) and over tensor by kv heads."""
    from llm_jax.config import MeshConfig
    from llm_jax.parallel.sharding import make_layout

    cfg, params = model
    layout = make_layout(
        MeshConfig(
            data=2,
            pipeline=1,
            fsdp=1,
            expert=1,
            context=1,
            tensor=2,
            dcn_data=1,
            rules="fsdp_tp",
            microbatches=0,
            pipeline_repeats=1,
        ),
        jax.devices()[:4],
    )
    one, mesh = _engine(cfg, params), _engine(cfg, params, layout=layout)
    outs = []
    for engine in (one, mesh):
        requests = [engine.submit(_request(r)) for r in ROWS]
        outs.append([list(r.tokens()) for r in requests])
    assert outs[0] == outs[1] and [len(o) for o in outs[0]] == [12, 20, 7]
    pages = mesh.model.pages[0]["k"]  # [blocks, kv_heads, block, head_dim]: blocks over data, kv heads over tensor
    per_shard = mesh.model.pool.per_shard
    assert {s.data.shape[:2] for s in pages.addressable_shards} == {(per_shard, cfg.n_kv_heads // 2)}


@pytest.mark.slow
def test_the_pallas_paged_kernel_decodes_what_the_gathered_cache_does(model):
    """model.attention=splash puts the pool in the TPU kernel's layout [K, L, blocks, block, H] and decodes
    through jax's Pallas paged-attention kernel (interpreted here, compiled on TPUs: test_compile.py);
    prompt chunks gather the blocks. The kernel reads keys and values in bfloat16 (exact to 1e-6 given
    bfloat16 inputs, measured), which moves a sampled row's draws: greedy outputs equal the Generator's
    alone, on one device and with rows over data 2, kv heads over tensor 2."""
    from llm_jax.config import MeshConfig
    from llm_jax.parallel.sharding import make_layout

    cfg, params = model
    greedy = [(p, n, 0.0, 0, 1.0, s) for p, n, _, _, _, s in ROWS]
    alone = [list(Generator(cfg, params).stream(*row)) for row in greedy]
    kernel_cfg = dataclasses.replace(cfg, attention="splash")
    layout = make_layout(
        MeshConfig(
            data=2,
            pipeline=1,
            fsdp=1,
            expert=1,
            context=1,
            tensor=2,
            dcn_data=1,
            rules="fsdp_tp",
            microbatches=0,
            pipeline_repeats=1,
        ),
        jax.devices()[:4],
    )
    for mesh in (None, layout):
        engine = _engine(kernel_cfg, params, layout=mesh)
        pages, model = engine.model.pages[0]["k"], engine.model
        assert pages.shape == (cfg.n_kv_heads, 1, model.shards * model.pool.per_shard, 8, cfg.head_dim)
        requests = [engine.submit(_request(r)) for r in greedy]
        assert [list(r.tokens()) for r in requests] == alone


def test_each_batch_shard_hands_out_its_own_blocks_to_the_slots_it_holds():
    """Two batch shards, 4 usable blocks each (block ids 1-4 and 6-9; 0 and 5 scratch): slot s is held
    by shard s % 2; a request takes the lowest free slot whose shard has its blocks."""
    from llm_jax.inference.blocks import BlockPool

    pool = BlockPool(5, 2)
    assert (pool.total, pool.capacity, pool.free) == (8, 4, 8)
    assert pool.take(3, 1) == ([6, 7, 8], 0) and pool.take(2, 1) is None and pool.take(4, 0) == ([1, 2, 3, 4], 0)
    pool.give([6, 7, 8])
    assert pool.free == 4 and pool.take(4, 1) == ([6, 7, 8, 9], 0)

    class Sharded:  # PagedModel's placement without a model: admit is all it needs
        admit, blocks_for = PagedModel.admit, PagedModel.blocks_for

        def __init__(self):
            self.shards, self.block, self.pool = 2, 8, BlockPool(5, 2)

    m = Sharded()
    assert m.admit([0, 1, 2, 3], 30) == (0, [1, 2, 3, 4], 0)  # shard 0's four blocks
    assert m.admit([1, 2, 3], 30) == (1, [6, 7, 8, 9], 0)  # slot 2 (shard 0) has none left: slot 1
    assert m.admit([2, 3], 8) is None


def test_a_prompt_that_begins_as_an_earlier_one_prefills_only_the_rest(model):
    """Prefix sharing, blocks of 8: prompts of a 19-token preamble and different endings, one after
    another. Each later one takes the two full blocks (16 tokens) that the first one wrote and prefills
    (or, with rides, carries in the decode step) only the rest, and gets exactly the tokens it gets
    alone; with sharing off every token is prefilled. A prompt that continues the first request's
    prompt and output (a chat's next turn) takes the blocks its output filled too."""
    cfg, params = model
    preamble = list(range(40, 59))
    rows = [(preamble + end, 6, t, 0, 1.0, s) for end, t, s in (([3], 0.0, 0), ([7, 9, 2], 0.0, 0), ([5, 1], 0.8, 3))]
    gen = Generator(cfg, params)
    alone = [list(gen.stream(*row)) for row in rows]
    for share, rides in ((True, 0), (True, 24), (False, 0)):
        engine = _engine(cfg, params, rides=rides, share=share)
        assert [list(engine.submit(_request(row)).tokens()) for row in rows] == alone, (share, rides)
        assert engine.stats["shared_tokens"] == (32 if share else 0)
        assert engine.stats["prompt_tokens"] == sum(len(row[0]) for row in rows) - engine.stats["shared_tokens"]
        assert engine.load()["kv_blocks_used"] == 0
        if share:  # the next turn: the first prompt, its output and more; 3 blocks of it written, shared
            turn = (rows[0][0] + alone[0] + [3], 4, 0.0, 0, 1.0, 0)
            assert list(engine.submit(_request(turn)).tokens()) == list(gen.stream(*turn))
            assert engine.stats["shared_tokens"] == 32 + 24


def test_shared_prompt_blocks_stay_readable_until_their_space_is_needed():
    """A pool of 5 blocks: blocks shared under a prompt's keys are taken by a prompt that begins alike,
    counted per holder; unheld, they stay readable, and are handed out fresh only once the never-shared
    blocks are gone, a prompt's last block first."""
    from llm_jax.inference.blocks import BlockPool, prefix_keys

    keys = prefix_keys(list(range(24)), 8)
    other = prefix_keys(list(range(16)) + [99] * 8, 8)
    assert len(keys) == 3 and other[:2] == keys[:2] and other[2] != keys[2] and prefix_keys([1] * 7, 8) == []
    pool = BlockPool(6)
    a = pool.take(4, 0, keys[:2])
    assert a == ([1, 2, 3, 4], 0)
    pool.share(a[0], keys)  # the prompt's three full blocks
    b = pool.take(3, 0, other)
    assert b == ([1, 2, 5], 2) and pool.take(1, 0) is None
    pool.give(a[0])  # 1 and 2 are still held by b, 3 idle, 4 free
    assert (pool.free, pool.idle) == (2, 1)
    pool.give(b[0])
    assert (pool.free, pool.idle) == (5, 3)
    whole = pool.take(3, 0, keys)
    assert whole == ([1, 2, 3], 3) and (pool.free, pool.idle) == (2, 0)
    pool.give(whole[0])
    assert pool.take(5, 0) == ([5, 4, 3, 2, 1], 0)  # the free ones, then the idle: last block first
    pool.give([5, 4, 3, 2, 1])
    assert pool.take(1, 0, keys) == ([5], 0) and pool.idle == 0  # their keys went with them


def test_a_request_for_log_probs_that_joins_beside_a_riding_prompt_gets_its_scores(model):
    """Two requests admitted in one round, the first short enough to ride, the second wanting
    log-probs (prefilled apart): the round's step must not be a riding one (it scores nothing), so
    every token of the second has its log-prob."""
    cfg, params = model
    engine = _engine(cfg, params, rides=24)
    with engine.wake:  # both wait before the engine's next round
        short = engine.submit(Request([5, 9, 7], 4, 0.0, 0, 1.0, 0))
        scored = engine.submit(Request([8, 8, 1], 4, 0.0, 0, 1.0, 0, logprobs=True))
    assert len(list(short.tokens())) == 4 and len(list(scored.tokens())) == 4
    assert len(scored.scores) == 4 and all(s is not None for s in scored.scores)
