"""Sampling with a static-size KV cache: one jitted prefill over the (bucket-padded) prompt, then a
jitted one-token decode step per new token, streamed as text.

The cache holds model.seq_len positions, so prompt + new tokens must fit in the context. When they
do not, the prompt keeps its last seq_len - max_new_tokens tokens (the most recent text matters
most) and a note says how many were dropped; max_new_tokens is capped at seq_len - 1.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model.transformer import Transformer, init_cache


def sample_token(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits [B, V] -> tokens [B]. Greedy at temperature 0; top_k 0 and top_p 1 disable those filters.

    The settings are traced values, so changing them does not recompile.
    """
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    keep = ((top_k <= 0) | (rank < top_k)) & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # rank 0 always kept
    choice = jax.random.categorical(rng, jnp.where(keep, ranked, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def fit_prompt(ids: list[int], seq_len: int, max_new_tokens: int) -> tuple[list[int], int, str | None]:
    """Applies the context rule in the module docstring; returns (ids, max_new_tokens, note)."""
    notes = []
    if max_new_tokens > seq_len - 1:
        notes.append(f"max_new_tokens {max_new_tokens} capped at {seq_len - 1} (context {seq_len})")
        max_new_tokens = seq_len - 1
    room = seq_len - max_new_tokens
    if len(ids) > room:
        notes.append(f"prompt has {len(ids)} tokens; kept its last {room} so that {max_new_tokens} new tokens "
                     f"fit the {seq_len}-token context (lower max_new_tokens to keep more)")
        ids = ids[-room:]
    return ids, max_new_tokens, "; ".join(notes) or None


class Generator:
    """Generation for one model; compiled once per prompt-length bucket."""

    def __init__(self, cfg: ModelConfig, params):
        self.cfg, self.params = cfg, params
        model = Transformer(cfg)

        def prefill(params, tokens, length, rng, settings):
            """tokens [1, P_bucket] (right-padded) -> first new token, cache."""
            hidden, cache = model.apply({"params": params}, tokens, cache=init_cache(cfg, tokens.shape[0]))
            last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
            logits = model.apply({"params": params}, last, method=Transformer.logits)[:, 0]
            return sample_token(logits, rng, *settings), cache

        def decode(params, cache, token, index, rng, settings):
            """token [B] at position `index` -> next token [B], cache."""
            hidden, cache = model.apply({"params": params}, token[:, None], cache=cache, cache_index=index)
            logits = model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]
            return sample_token(logits, rng, *settings), cache

        self._prefill = jax.jit(prefill)
        self._decode = jax.jit(decode, donate_argnums=1)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
        """Yields new token ids until max_new_tokens or a stop id (not yielded). Call fit_prompt first."""
        n = len(prompt_ids)
        if not (0 < n and n + max_new_tokens <= self.cfg.seq_len):
            raise ValueError(f"prompt of {n} tokens + {max_new_tokens} new exceeds {self.cfg.seq_len}; use fit_prompt")
        bucket = min(self.cfg.seq_len, 1 << max(4, (n - 1).bit_length()))
        tokens = jnp.asarray([prompt_ids + [0] * (bucket - n)], jnp.int32)
        settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        rng = jax.random.PRNGKey(seed)
        token, cache = self._prefill(self.params, tokens, n, jax.random.fold_in(rng, 0), settings)
        for i in range(max_new_tokens):
            tok = int(token[0])
            if tok in stop_ids:
                return
            yield tok
            if i + 1 < max_new_tokens:
                token, cache = self._decode(self.params, cache, token, n + i, jax.random.fold_in(rng, i + 1), settings)


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Token ids -> text pieces, holding back bytes of a character not yet complete."""
    ids, shown = [], 0
    for tok in token_ids:
        ids.append(tok)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[shown:]
        shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]
