"""Sampling with a static-size KV cache: one jitted prefill over the (bucket-padded) prompt, then a
jitted one-token decode step per new token, streamed as text.

The cache holds model.seq_len positions, so prompt + new tokens must fit in the context. When they
do not, the prompt keeps its last seq_len - max_new_tokens tokens (the most recent text matters
most) and a note says how many were dropped; max_new_tokens is capped at seq_len - 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.dense import inference_params
from llm_jax.model.kv_cache import init_cache
from llm_jax.model.transformer import Transformer, unstack_layers
from llm_jax.parallel.sharding import Layout, abstract_params, mesh_scope

# New tokens per decode call, at most: one dispatch and one host read per chunk (the demo model at batch
# 16 in bfloat16, 2 cores, before the transposed value cache: 3.9 ms a token one at a time, 2.9 in chunks
# of 8, 2.6 in chunks of 16). A chunk is the next power of two of the steps left, up to DECODE_CHUNK, so
# at most 5 sizes compile and a chunk computes at most half of itself that no row reads.
DECODE_CHUNK = 16


def sample_token(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits [B, V], one PRNG key per row [B, 2] ([2] when B = 1), settings scalars or [B] -> tokens [B].

    Greedy at temperature 0; top_k 0 and top_p 1 disable those filters. The settings are traced
    values, so changing them does not recompile. A batch of greedy rows skips the sampling, and one
    without filters skips them (lax.cond over the batch). No sort: XLA:CPU sorts 16 x 8192 logits in
    ~22 ms, 20x the whole decode step, so the filters find each row's probability floor by bisection
    and the token is drawn by inverse CDF from one uniform number per row.
    """
    b = logits.shape[0]
    keys = jnp.reshape(keys, (b, 2))
    temperature, top_k, top_p = (jnp.broadcast_to(jnp.asarray(x), (b,)) for x in (temperature, top_k, top_p))
    greedy = first_argmax(logits)

    def sample(_):
        probs = jax.nn.softmax(logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
        floor = jax.lax.cond(
            jnp.any(top_k > 0) | jnp.any(top_p < 1), _filter_floor, lambda *_: jnp.zeros(b), probs, top_k, top_p
        )
        cdf = jnp.cumsum(jnp.where(probs >= floor[:, None], probs, 0.0), axis=-1)
        u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
        drawn = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), logits.shape[1] - 1)  # first index with cdf > u
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)


def first_argmax(logits: jax.Array, block: int = 128) -> jax.Array:
    """logits [B, V] -> the first index of each row's largest value [B] (int32), as jnp.argmax, faster on
    XLA:CPU: the row's max over blocks of `block` logits, then the first block that holds it and the first
    index in that block (demo model, 16 x 16384 float32 on 2 Xeon cores: 0.15 ms, against 0.35 ms for one
    max + a masked min over the whole row and 0.47 ms for jnp.argmax). A row with NaN logits (a broken
    model) gets an index in range, not necessarily the first NaN's as from jnp.argmax."""
    b, v = logits.shape
    if v % block:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    blocks = logits.reshape(b, v // block, block)
    block_max = jnp.max(blocks, axis=-1)  # [B, V / block]
    top = jnp.max(block_max, axis=-1, keepdims=True)
    first = jnp.argmax(block_max == top, axis=-1)  # [B]
    within = jnp.argmax(jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0] == top, axis=-1)
    return (first * block + within).astype(jnp.int32)


def _filter_floor(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, halvings: int = 32) -> jax.Array:
    """probs [B, V] -> the smallest probability each row keeps [B]: the highest t with at least top_k
    tokens p >= t (top_k > 0), and the highest t whose tokens p >= t hold top_p of the mass
    (top_p < 1; the token that crosses top_p is kept), whichever is higher. Bisection over [0, max p]."""
    zero, top = jnp.zeros(probs.shape[0]), jnp.max(probs, axis=-1)

    def halve(_, bounds):
        lo_k, hi_k, lo_p, hi_p = bounds
        mid_k, mid_p = (lo_k + hi_k) / 2, (lo_p + hi_p) / 2
        ok_k = jnp.sum(probs >= mid_k[:, None], axis=-1) >= top_k
        ok_p = jnp.sum(jnp.where(probs >= mid_p[:, None], probs, 0.0), axis=-1) >= top_p
        return (
            jnp.where(ok_k, mid_k, lo_k),
            jnp.where(ok_k, hi_k, mid_k),
            jnp.where(ok_p, mid_p, lo_p),
            jnp.where(ok_p, hi_p, mid_p),
        )

    lo_k, _, lo_p, _ = jax.lax.fori_loop(0, halvings, halve, (zero, top, zero, top))
    return jnp.maximum(jnp.where(top_k > 0, lo_k, 0.0), jnp.where(top_p < 1, lo_p, 0.0))


def fit_prompt(ids: list[int], seq_len: int, max_new_tokens: int) -> tuple[list[int], int, str | None]:
    """Applies the context rule in the module docstring; returns (ids, max_new_tokens, note)."""
    notes = []
    if max_new_tokens > seq_len - 1:
        notes.append(f"max_new_tokens {max_new_tokens} capped at {seq_len - 1} (context {seq_len})")
        max_new_tokens = seq_len - 1
    room = seq_len - max_new_tokens
    if len(ids) > room:
        notes.append(
            f"prompt has {len(ids)} tokens; kept its last {room} so that {max_new_tokens} new tokens "
            f"fit the {seq_len}-token context (lower max_new_tokens to keep more)"
        )
        ids = ids[-room:]
    return ids, max_new_tokens, "; ".join(notes) or None


def sample_rows(logits: jax.Array, seeds: jax.Array, step, settings) -> jax.Array:
    """logits [B, V], seeds [B], step (scalar or [B]): the index of the new token being drawn, settings
    (temperature, top_k, top_p) each [B] -> tokens [B]; row r draws with fold_in(PRNGKey(seed_r), step_r),
    so a row's tokens never depend on its batch."""
    steps = jnp.broadcast_to(jnp.asarray(step), seeds.shape)
    keys = jax.vmap(lambda seed, s: jax.random.fold_in(jax.random.PRNGKey(seed), s))(seeds, steps)
    temperature, top_k, top_p = settings
    return sample_token(logits, keys, temperature, jnp.asarray(top_k).astype(jnp.int32), top_p)


def serving_params(cfg: ModelConfig, params, layout: Layout | None):
    """A run's parameters as a serving model reads them: split over the layout's mesh as in training
    (already there when load_run placed them), matrices in the compute dtype, layers unstacked on CPU."""
    if layout:
        shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_params(cfg, layout))
        params = jax.device_put(params, shardings)
    return unstack_layers(inference_params(cfg, params))


def serving_steps(cfg: ModelConfig):
    """The two functions a server runs, before jit: prefill(params, tokens [B, P], lengths [B], seeds [B],
    settings) -> (first new tokens [B], KV cache) and decode(params, cache, token [B], lengths, seeds,
    step, settings) -> (next tokens [B], cache); settings are (temperature, top_k, top_p), each [B]."""
    model = Transformer(cfg, serving=True)  # its parameters: serving_params(...)

    def prefill(params, tokens, lengths, seeds, settings):
        """tokens [B, P_bucket] (right-padded), lengths [B] -> first new tokens [B], cache."""
        cache = init_cache(cfg, tokens.shape[0], per_layer=model.unstacked)
        hidden, cache = model.apply({"params": params}, tokens, cache=cache)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        logits = model.apply({"params": params}, last, method=Transformer.logits)[:, 0]
        return sample_rows(logits, seeds, 0, settings), cache

    def decode(params, cache, token, lengths, seeds, step, settings):
        """token [B], the step-th new token of each row, at position lengths + step - 1 -> next tokens [B], cache.
        A stopped row keeps writing past its end (clamped to the cache), unread."""
        index = jnp.minimum(lengths + step - 1, cfg.seq_len - 1)
        hidden, cache = model.apply({"params": params}, token[:, None], cache=cache, cache_index=index)
        logits = model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]
        return sample_rows(logits, seeds, step, settings), cache

    return prefill, decode


def decode_steps(decode, n: int):
    """n decode steps in one call: (params, cache, token [B], lengths, seeds, step, settings) -> (the
    next n tokens [n, B], cache). One dispatch and one host read per n tokens instead of per token."""

    def run(params, cache, token, lengths, seeds, step, settings):
        def one(carry, i):
            token, cache = carry
            token, cache = decode(params, cache, token, lengths, seeds, step + i, settings)
            return (token, cache), token

        (_, cache), tokens = jax.lax.scan(one, (token, cache), jnp.arange(n))
        return tokens, cache

    return run


class Generator:
    """Generation for one model; compiled once per (batch size, prompt-length bucket).

    A batch holds prompts of different lengths, right-padded to a common bucket; each row keeps its
    own cache position, sampling settings and seed, so a row produces exactly the tokens its prompt
    produces alone (row r's step-i key is fold_in(PRNGKey(seed_r), i) either way).

    With a layout (llm_jax/parallel/sharding.py), parameters are split over its mesh as in training and the
    KV cache like the activations: rows over the batch axes, kv heads over tensor (CACHE_AXES); a
    batch gets idle rows up to a multiple of the batch shards."""

    def __init__(self, cfg: ModelConfig, params, layout: Layout | None = None, chunk: int = DECODE_CHUNK):
        self.cfg, self.layout, self.chunk = cfg, layout, chunk
        self.row_multiple = layout.axis_size("batch") if layout else 1
        self.params = serving_params(cfg, params, layout)
        prefill, self._decode_step = serving_steps(cfg)
        self._prefill = jax.jit(prefill)
        self._decode = {}  # chunk size -> its jitted decode_steps

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: tuple[int, ...] = (),
    ) -> Iterator[int]:
        """Yields new token ids until max_new_tokens or a stop id (not yielded). Call fit_prompt first."""
        for (tok,) in self.stream_batch(
            [prompt_ids], [max_new_tokens], [temperature], [top_k], [top_p], [seed], stop_ids
        ):
            if tok is None:
                return
            yield tok

    def stream_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        seeds: list[int],
        stop_ids: tuple[int, ...] = (),
    ) -> Iterator[list[int | None]]:
        """Per step, each row's new token, or None once the row stopped (its budget or a stop id);
        ends when every row has stopped. Prompts must fit with their budgets (fit_prompt)."""
        for ids, new in zip(prompts, max_new_tokens):
            if not (len(ids) > 0 and len(ids) + new <= self.cfg.seq_len):
                raise ValueError(f"prompt of {len(ids)} tokens + {new} new exceeds {self.cfg.seq_len}; use fit_prompt")
        rows = len(prompts)
        idle = -rows % self.row_multiple  # rows with a one-token prompt and no budget
        prompts, max_new_tokens, temperature, top_k, top_p, seeds = (
            list(column) + [pad] * idle
            for column, pad in zip(
                (prompts, max_new_tokens, temperature, top_k, top_p, seeds), ([0], 0, 0.0, 0, 1.0, 0)
            )
        )
        lengths = [len(ids) for ids in prompts]
        bucket = min(self.cfg.seq_len, 1 << max(4, (max(lengths) - 1).bit_length()))
        tokens = jnp.asarray([ids + [0] * (bucket - len(ids)) for ids in prompts], jnp.int32)
        settings = (
            jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
        )
        seeds_arr = jnp.asarray(seeds, jnp.uint32)
        lengths_arr = jnp.asarray(lengths, jnp.int32)
        with mesh_scope(self.layout):
            token, cache = self._prefill(self.params, tokens, lengths_arr, seeds_arr, settings)
        live, steps = [new > 0 for new in max_new_tokens], max(max_new_tokens)
        pending = [token.tolist()]  # the tokens of steps i, i + 1, ... not yet yielded
        for i in range(steps):
            out = []
            for r, tok in enumerate(pending.pop(0)):
                live[r] = live[r] and i < max_new_tokens[r] and tok not in stop_ids
                out.append(tok if live[r] else None)
            if not any(live):
                return
            yield out[:rows]
            if not pending and i + 1 < steps:  # the next chunk: steps i + 1 .. i + n
                n = min(self.chunk, 1 << (steps - i - 2).bit_length())
                if n not in self._decode:
                    self._decode[n] = jax.jit(decode_steps(self._decode_step, n), donate_argnums=1)
                with mesh_scope(self.layout):
                    tokens, cache = self._decode[n](self.params, cache, token, lengths_arr, seeds_arr, i + 1, settings)
                token = tokens[-1]
                pending = tokens.tolist()


def stream_text(tokenizer, token_ids: Iterator[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Token ids -> text pieces (text_pieces without the token counts)."""
    return (piece for piece, _ in text_pieces(tokenizer, token_ids, stop))


def text_pieces(tokenizer, token_ids: Iterator[int], stop: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """Token ids -> (text piece, how many tokens the text so far covers), holding back bytes of a
    character not yet complete. With stop strings, the text ends just before the first one (which is
    not shown) and no further token is drawn; the last len(longest stop) - 1 characters wait until
    they cannot begin one."""
    ids, shown, hold = [], 0, max((len(s) for s in stop), default=1) - 1
    for tok in token_ids:
        ids.append(tok)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        end = first_stop(text, stop, shown)
        if end is not None:
            yield text[shown:end], len(ids)
            return
        if len(text) - hold > shown:
            yield text[shown : len(text) - hold], len(ids)
            shown = len(text) - hold
    text = tokenizer.decode(ids)
    end = first_stop(text, stop, shown)
    if (len(text) if end is None else end) > shown:
        yield text[shown:end], len(ids)


def first_stop(text: str, stop: Sequence[str], shown: int = 0) -> int | None:
    """Where the earliest stop string starts in text (searching only text not yet fully shown)."""
    starts = [i for s in stop if s and (i := text.find(s, max(0, shown - len(s) + 1))) >= 0]
    return min(starts, default=None)
