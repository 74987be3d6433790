"""Continuous batching's device side: a pool of KV-cache blocks (llm_jax/model/kv_cache.py, paged), the
allocator that hands them out, and the two jitted steps a scheduler (llm_jax/inference/engine.py) runs:

- prefill: the next chunk of up to `chunk` prompt tokens of a few requests, written into their blocks;
  a request whose prompt ends in the chunk gets its first new token (and, asked for, the log-probs of
  its prompt tokens);
- decode: n steps of every slot of a fixed-size batch; idle slots compute at position -1 (scratch).

Sampling is generate.py's: a row's i-th new token is drawn with fold_in(PRNGKey(seed), i), so a request
gets the tokens it gets alone, whoever shares its batch. Shapes are bucketed to powers of two (prefill
rows and chunk length, decode steps), so a handful of programs compile.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.generate import DECODE_CHUNK, sample_rows, serving_params
from llm_jax.model.kv_cache import init_pages, with_table, without_table
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import Layout

TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's limit)
# decode steps per dispatch (a round takes the largest that no running row overshoots); with the row
# buckets (powers of two up to the batch) 15 decode programs for the demo's batch of 16
DECODE_STEPS = (1, 4, DECODE_CHUNK)


class BlockPool:
    """The free blocks of the pool (block 0, the scratch block, is never handed out)."""

    def __init__(self, blocks: int):
        self.total = blocks - 1
        self._free = list(range(blocks - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclasses.dataclass
class Scores:
    """What a step returns per sampled (or scored) token, host-side numpy: the token's log-prob under
    the model (before temperature and filters) and the TOP_LOGPROBS most likely ids and their log-probs;
    None where no request of the step asked for log-probs."""

    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def token_scores(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [..., V], tokens [...] -> (log p(token) [...], top ids [..., TOP_LOGPROBS], their log-probs)."""
    logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logps, tokens[..., None], axis=-1)[..., 0]
    top, ids = jax.lax.top_k(logps, TOP_LOGPROBS)
    return chosen, ids, top


class PagedModel:
    """A run's model for continuous batching: serving parameters, the block pool on device and the
    compiled steps. `rows` is the decode batch (a multiple of the layout's batch shards)."""

    def __init__(self, cfg: ModelConfig, params, layout: Layout | None, rows: int, blocks: int, block: int, chunk: int):
        if cfg.seq_len % block:
            raise ValueError(f"the KV block size {block} must divide the context {cfg.seq_len}")
        self.cfg, self.layout, self.block, self.chunk = cfg, layout, block, chunk
        self.row_multiple = layout.axis_size("batch") if layout else 1
        self.rows = -(-rows // self.row_multiple) * self.row_multiple
        self.table_width = cfg.seq_len // block
        self.params = serving_params(cfg, params, layout)
        self.model = Transformer(cfg, serving=True)
        with self._mesh():
            self.pages = jax.jit(lambda: init_pages(cfg, blocks, block, per_layer=self.model.unstacked))()
        self.pool = BlockPool(blocks)
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(7,), donate_argnums=1)
        self._decode = jax.jit(self._decode_fn, static_argnums=(8, 9), donate_argnums=1)

    def warm_up(self, prefill_rows: int) -> None:
        """Compiles every prefill (rows x chunk length) and decode (steps) shape before serving, so that no
        request waits for the compiler (a second each for the demo model on 2 cores). Idle inputs: every
        position -1, written to the scratch block."""
        lengths, length = [], 16
        while not lengths or lengths[-1] < min(self.chunk, self.cfg.seq_len):
            lengths, length = [*lengths, min(self.chunk, length)], length * 2
        rows = max(self.row_multiple, 1)
        while True:
            for length in lengths:
                idle = {"ids": [], "start": 0, "targets": [], "table": self.table([]), "seed": 0, "settings": (0, 0, 1)}
                self.prefill([idle] * rows, False, length)
            if rows >= prefill_rows:
                break
            rows *= 2
        for width in sorted({self.decode_rows(n) for n in range(1, self.rows + 1)}):
            idle = {"token": [0] * width, "position": [-1] * width, "table": [self.table([])] * width}
            idle |= {"step": [0] * width, "seed": [0] * width, "settings": [[0] * width, [0] * width, [1] * width]}
            for steps in DECODE_STEPS:
                self.decode(idle, steps, False)

    def decode_rows(self, used: int) -> int:
        """How many slots a decode computes when the first `used` hold the running rows (slots are handed
        out lowest first): a power of two, a multiple of the batch shards, at most `rows`."""
        return min(self.rows, max(self.row_multiple, 1 << (used - 1).bit_length()))

    def _mesh(self):
        return self.layout.activate() if self.layout else contextlib.nullcontext()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block)

    def table(self, blocks: list[int]) -> list[int]:
        return blocks + [0] * (self.table_width - len(blocks))

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(
        self, chunks: list[dict], score: bool, length: int = 0
    ) -> tuple[np.ndarray, Scores | None, Scores | None]:
        """chunks: per request {"ids": its next prompt tokens, "start": their first position, "table",
        "targets": the tokens each position predicts (the next prompt token; the last one's is unknown:
        any), "seed", "settings": (temperature, top_k, top_p)}. -> (each request's token sampled after
        its chunk's last position [R], Scores of those tokens, Scores of the targets [R, C]) (Scores
        only with `score`). `length`: the chunk length to compile for (default: the bucket of the longest)."""
        n = len(chunks)
        rows = max(self.row_multiple, 1 << (n - 1).bit_length())
        longest = max(1, *(len(c["ids"]) for c in chunks))
        length = length or min(self.chunk, max(16, 1 << (longest - 1).bit_length()))
        tokens = np.zeros((rows, length), np.int32)
        positions = np.full((rows, length), -1, np.int32)
        targets = np.zeros((rows, length), np.int32)
        tables = np.zeros((rows, self.table_width), np.int32)
        last = np.zeros(rows, np.int32)
        seeds = np.zeros(rows, np.uint32)
        settings = np.zeros((3, rows), np.float32)
        settings[2] = 1.0
        for r, c in enumerate(chunks):
            k = len(c["ids"])
            tokens[r, :k], targets[r, :k], tables[r] = c["ids"], c["targets"], c["table"]
            positions[r, :k] = np.arange(c["start"], c["start"] + k)
            last[r], seeds[r], settings[:, r] = k - 1, c["seed"], c["settings"]
        with self._mesh():
            out, first_scores, target_scores, self.pages = self._prefill(
                self.params, self.pages, tokens, positions, tables, last, (seeds, targets, *settings), score
            )
        out = np.asarray(out)[:n]
        if not score:
            return out, None, None
        first, chunk = (Scores(*(np.asarray(x)[:n] for x in s)) for s in (first_scores, target_scores))
        return out, first, chunk

    def _prefill_fn(self, params, pages, tokens, positions, tables, last, extra, score):
        seeds, targets, temperature, top_k, top_p = extra
        hidden, pages = self.model.apply(
            {"params": params}, tokens, positions=positions, cache=with_table(pages, tables)
        )
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [R, 1, D]
        logits = self.model.apply({"params": params}, final, method=Transformer.logits)[:, 0]
        token = sample_rows(logits, seeds, 0, (temperature, top_k, top_p))
        if not score:
            return token, None, None, without_table(pages)
        chunk_logits = self.model.apply({"params": params}, hidden, method=Transformer.logits)
        return token, token_scores(logits, token), token_scores(chunk_logits, targets), without_table(pages)

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, slots: dict, steps: int, score: bool) -> tuple[np.ndarray, Scores | None]:
        """slots: arrays over the first decode_rows(...) slots: "token" (the last token of each row), "position"
        (where it goes; -1: idle), "table", "step" (the index of the token to sample), "seed", "settings"
        [3, rows]; steps: one of DECODE_STEPS. -> (the next `steps` tokens of every slot [steps, rows],
        their Scores [steps, rows, ...])."""
        n = steps
        args = [np.asarray(slots[k], np.int32) for k in ("token", "position", "table", "step")]
        settings = tuple(np.asarray(slots["settings"], np.float32))
        with self._mesh():
            tokens, scores, self.pages = self._decode(
                self.params, self.pages, *args, np.asarray(slots["seed"], np.uint32), settings, n, score
            )
        return np.asarray(tokens), (Scores(*(np.asarray(x) for x in scores)) if score else None)

    def _decode_fn(self, params, pages, token, position, table, step, seeds, settings, n, score):
        idle = position < 0

        def one(carry, i):
            token, pages = carry
            pos = jnp.where(idle, -1, position + i)
            cache = with_table(pages, table)
            hidden, cache = self.model.apply({"params": params}, token[:, None], positions=pos[:, None], cache=cache)
            logits = self.model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]
            new = sample_rows(logits, seeds, step + i, settings)
            scores = token_scores(logits, new) if score else ()
            return (new, without_table(cache)), (new, scores)

        (_, pages), (tokens, scores) = jax.lax.scan(one, (token, pages), jnp.arange(n))
        return tokens, scores, pages
