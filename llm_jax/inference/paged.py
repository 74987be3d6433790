"""Continuous batching's device side: a pool of KV-cache blocks (llm_jax/model/kv_pages.py; who holds
which: llm_jax/inference/blocks.py) and the jitted steps a scheduler (llm_jax/inference/engine.py) runs:

- prefill: the next chunk of up to `chunk` prompt tokens of a few requests, written into their blocks;
  a request whose prompt ends in the chunk gets its first new token (and, asked for, the log-probs of
  its prompt tokens);
- decode: n steps of every slot of a fixed-size batch; idle slots compute at position -1 (scratch).

Sampling is generate.py's: a row's i-th new token is drawn with fold_in(PRNGKey(seed), i), so a request
gets the tokens it gets alone, whoever shares its batch. Shapes are bucketed to powers of two (prefill
rows and chunk length, decode steps), so a handful of programs compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.blocks import BlockPool, blocks_per_shard
from llm_jax.inference.generate import DECODE_CHUNK, sample_rows, serving_params
from llm_jax.model.kv_pages import init_pages, paged_kernel, with_table, without_table
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import Layout, mesh_scope

TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's limit)
# decode steps per dispatch (a round takes the largest that no running row overshoots); with the row
# buckets (powers of two up to the batch) 15 decode programs for the demo's batch of 16
DECODE_STEPS = (1, 4, DECODE_CHUNK)
# Short prompts ride in a decode step (PagedModel.ride): each prompt token a row of its own that writes its
# keys and values and attends to its sequence's blocks as a decoding row does, the LM head run on the
# decoding rows and each prompt's last row only. Up to `rides` prompt tokens a step (serve --ride-tokens),
# from at most RIDERS prompts; rows in multiples of RIDE_ROWS. Demo model, 2 Xeon cores: 16 decoding rows with 24
# prompt rows take 5.7 ms, against a 3.4 ms step plus 3.6 ms for a 20-token prompt prefilled apart (its
# fixed cost: XLA:CPU's ~400 small ops a call). Each prompt row reads its sequence's whole table, so only
# contexts up to MAX_RIDE_CONTEXT ride, and not where the pool is split over batch shards or read by the
# TPU kernel.
RIDERS, RIDE_ROWS, MAX_RIDE_CONTEXT = 8, 8, 2048


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
    compiled steps. `rows` is the decode batch (rounded up to a multiple of the layout's batch shards);
    `blocks` the pool's blocks and one scratch block (split over the batch shards: each gets its share,
    rounded up, and a scratch block of its own).

    Slot s (the engine's row) is held by batch shard s % shards, and its blocks come from that shard's
    part of the pool; a step places each slot's row where its shard computes (decode: rows split in
    contiguous parts, slot s at (s % shards) x part + s // shards)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params,
        layout: Layout | None,
        rows: int,
        blocks: int,
        block: int,
        chunk: int,
        rides: int,
    ):
        if cfg.seq_len % block:
            raise ValueError(f"the KV block size {block} must divide the context {cfg.seq_len}")
        self.cfg, self.layout, self.block, self.chunk = cfg, layout, block, chunk
        self.shards = layout.axis_size("batch") if layout else 1
        self.rows = -(-rows // self.shards) * self.shards
        self.table_width = cfg.seq_len // block
        self.params = serving_params(cfg, params, layout)
        unstacked = Transformer(cfg, serving=True).unstacked
        self.pool = BlockPool(blocks_per_shard(blocks, self.shards), self.shards)
        pool_blocks = self.shards * self.pool.per_shard
        with mesh_scope(self.layout):
            self.pages = jax.jit(lambda: init_pages(cfg, pool_blocks, block, per_layer=unstacked))()
        can_ride = self.shards == 1 and not paged_kernel(cfg) and cfg.seq_len <= MAX_RIDE_CONTEXT
        self.rides = rides if can_ride else 0  # prompt tokens a decode step may carry (serve --ride-tokens)
        prefill, decode, ride = paged_steps(cfg)
        self._prefill = jax.jit(prefill, static_argnums=PREFILL_STATIC, donate_argnums=1)
        self._decode = jax.jit(decode, static_argnums=DECODE_STATIC, donate_argnums=1)
        self._ride = jax.jit(ride, donate_argnums=1)

    def warm_up(self, prefill_rows: int) -> None:
        """Compiles every prefill (rows x chunk length) and decode (steps) shape before serving, so that no
        request waits for the compiler (a second each for the demo model on 2 cores). Idle inputs: every
        position -1, written to the scratch block. A first step gives the pool (init_pages' arrays, placed
        apart) the placement every step returns, which the programs are then compiled for (else the first
        request compiled one again: 1.1 s)."""
        self.decode(self._idle(self.decode_rows(1)), 1, False)
        lengths, length = [], 16
        while not lengths or lengths[-1] < min(self.chunk, self.cfg.seq_len):
            lengths, length = [*lengths, min(self.chunk, length)], length * 2
        per_shard = 1
        while True:
            for length in lengths:
                self.prefill([], False, length, per_shard)
            if per_shard >= prefill_rows:
                break
            per_shard *= 2
        for width in sorted({self.decode_rows(n) for n in range(1, self.rows + 1)}):
            for steps in DECODE_STEPS:
                self.decode(self._idle(width), steps, False)
        for width in range(RIDE_ROWS, self.ride_rows(self.rows + self.rides) + 1, RIDE_ROWS) if self.rides else ():
            self.ride(self._idle(width), [])

    def _idle(self, width: int) -> dict:
        idle = {"token": [0] * width, "position": [-1] * width, "table": [self.table([])] * width}
        return idle | {"step": [0] * width, "seed": [0] * width, "settings": [[0] * width, [0] * width, [1] * width]}

    def decode_rows(self, used: int) -> int:
        """How many slots a decode computes when the first `used` hold the running rows (slots are handed
        out lowest first): a power of two (or the next multiple of the batch shards), at most `rows`."""
        return min(self.rows, -(-max(self.shards, 1 << (used - 1).bit_length()) // self.shards) * self.shards)

    def ride_rows(self, used: int) -> int:
        """The rows of a decode step carrying prompt tokens, `used` of them taken."""
        return -(-used // RIDE_ROWS) * RIDE_ROWS

    def admit(self, free_slots: list[int], tokens: int, keys: list[bytes] = ()) -> tuple[int, list[int], int] | None:
        """The lowest free slot whose shard has blocks for `tokens`, those blocks and how many of them hold
        the prompt's leading blocks already (shared under `keys`: BlockPool.take) (None: no shard has)."""
        tried = set()
        for slot in sorted(free_slots):
            if slot % self.shards not in tried:
                tried.add(slot % self.shards)
                taken = self.pool.take(self.blocks_for(tokens), slot % self.shards, keys)
                if taken is not None:
                    return slot, *taken
        return None

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block)

    def table(self, blocks: list[int]) -> list[int]:
        return blocks + [0] * (self.table_width - len(blocks))

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(
        self, chunks: list[dict], score: bool, length: int = 0, per_shard: int = 0
    ) -> tuple[np.ndarray, Scores | None, Scores | None]:
        """chunks: per request {"ids": its next prompt tokens, "start": their first position, "table",
        "targets": the tokens each position predicts (the next prompt token; the last one's is unknown:
        any), "seed", "settings": (temperature, top_k, top_p)}. -> (each request's token sampled after
        its chunk's last position [R], Scores of those tokens, Scores of the targets [R, C]) (Scores
        only with `score`). `length`, `per_shard`: the chunk length and rows per batch shard to compile for
        (default: the buckets of the longest chunk and of the most chunks a shard has)."""
        shard = [c["table"][0] // self.pool.per_shard for c in chunks]  # a request's blocks are its shard's
        counts = [shard.count(j) for j in range(self.shards)]
        per_shard = per_shard or 1 << (max([1, *counts]) - 1).bit_length()
        assert per_shard >= max(counts), (per_shard, counts)  # a shard's chunks fit its rows
        rows = self.shards * per_shard
        place = [j * per_shard + shard[:i].count(j) for i, j in enumerate(shard)]  # each chunk's row
        longest = max([1, *(len(c["ids"]) for c in chunks)])
        length = length or min(self.chunk, max(16, 1 << (longest - 1).bit_length()))
        tokens = np.zeros((rows, length), np.int32)
        positions = np.full((rows, length), -1, np.int32)
        targets = np.zeros((rows, length), np.int32)
        tables = np.zeros((rows, self.table_width), np.int32)
        last = np.zeros(rows, np.int32)
        seeds = np.zeros(rows, np.uint32)
        settings = np.zeros((3, rows), np.float32)
        settings[2] = 1.0
        for r, c in zip(place, chunks):
            k = len(c["ids"])
            tokens[r, :k], targets[r, :k], tables[r] = c["ids"], c["targets"], c["table"]
            positions[r, :k] = np.arange(c["start"], c["start"] + k)
            last[r], seeds[r], settings[:, r] = k - 1, c["seed"], c["settings"]
        with mesh_scope(self.layout):
            out, first_scores, target_scores, self.pages = self._prefill(
                self.params, self.pages, tokens, positions, tables, last, (seeds, targets, *settings), score
            )
        out = np.asarray(out)[place]
        if not score:
            return out, None, None
        first, chunk = (Scores(*(np.asarray(x)[place] for x in s)) for s in (first_scores, target_scores))
        return out, first, chunk

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, slots: dict, steps: int, score: bool) -> tuple[np.ndarray, Scores | None]:
        """slots: arrays over the first decode_rows(...) slots: "token" (the last token of each row), "position"
        (where it goes; -1: idle), "table", "step" (the index of the token to sample), "seed", "settings"
        [3, rows]; steps: one of DECODE_STEPS. -> (the next `steps` tokens of every slot [steps, rows],
        their Scores [steps, rows, ...])."""
        width = len(slots["token"])
        assert width % self.shards == 0, (width, self.shards)  # decode_rows gives multiples of the shards
        row = np.arange(width)
        row = (row % self.shards) * (width // self.shards) + row // self.shards  # slot -> its shard's row
        order = np.argsort(row)  # row -> slot
        token, position, table, step = (
            np.asarray(slots[k], np.int32)[order] for k in ("token", "position", "table", "step")
        )
        seeds = np.asarray(slots["seed"], np.uint32)[order]
        settings = tuple(np.asarray(slots["settings"], np.float32)[:, order])
        with mesh_scope(self.layout):
            tokens, scores, self.pages = self._decode(
                self.params, self.pages, token, position, table, step, seeds, settings, steps, score
            )
        by_slot = lambda x: np.asarray(x)[:, row]  # noqa: E731  [steps, rows, ...] -> by slot
        return by_slot(tokens), (Scores(*map(by_slot, scores)) if score else None)

    def ride(self, rows: dict, emit: list[int]) -> np.ndarray:
        """One decode step whose rows (arrays as in `decode`, ride_rows wide, no batch shards) hold decoding
        slots and prompt tokens -> the token sampled at each row of `emit` (step 0 of a prompt's last row:
        its first new token); the LM head and sampling run on those rows only (padded to `rows`: every
        decoding row and riding prompt holds a slot, so at most that many are sampled)."""
        width = self.rows
        assert len(emit) <= width, (len(emit), width)
        arrays = [np.asarray(rows[k], np.int32) for k in ("token", "position", "table", "step")]
        seeds, settings = np.asarray(rows["seed"], np.uint32), tuple(np.asarray(rows["settings"], np.float32))
        at = np.zeros(width, np.int32)
        at[: len(emit)] = emit
        with mesh_scope(self.layout):
            tokens, self.pages = self._ride(self.params, self.pages, *arrays, seeds, settings, at)
        return np.asarray(tokens)[: len(emit)]


PREFILL_STATIC, DECODE_STATIC = (7,), (8, 9)  # score; steps, score


def paged_steps(cfg: ModelConfig):
    """The functions continuous batching runs, before jit (PagedModel's, `llm-jax compile`'s):

    prefill(params, pages, tokens [R, C], positions [R, C] (-1: padding), tables [R, M], last [R] (the
    chunk's last index), (seeds [R], targets [R, C], temperature, top_k, top_p [R]), score) -> (tokens [R],
    their Scores, the targets' Scores, pages); decode(params, pages, token [R], position [R] (-1: idle),
    table [R, M], step [R], seeds [R], settings [3][R], n, score) -> (tokens [n, R], Scores, pages); ride:
    one decode step sampling only the rows it is told to (prompts riding in it, PagedModel.ride)."""
    model = Transformer(cfg, serving=True)

    def prefill(params, pages, tokens, positions, tables, last, extra, score):
        seeds, targets, temperature, top_k, top_p = extra
        hidden, pages = model.apply({"params": params}, tokens, positions=positions, cache=with_table(pages, tables))
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [R, 1, D]
        logits = model.apply({"params": params}, final, method=Transformer.logits)[:, 0]
        token = sample_rows(logits, seeds, 0, (temperature, top_k, top_p))
        if not score:
            return token, None, None, without_table(pages)
        chunk_logits = model.apply({"params": params}, hidden, method=Transformer.logits)
        return token, token_scores(logits, token), token_scores(chunk_logits, targets), without_table(pages)

    def decode(params, pages, token, position, table, step, seeds, settings, n, score):
        idle = position < 0

        def one(carry, i):
            token, pages = carry
            pos = jnp.where(idle, -1, position + i)
            hidden, cache = model.apply(
                {"params": params}, token[:, None], positions=pos[:, None], cache=with_table(pages, table)
            )
            logits = model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]
            new = sample_rows(logits, seeds, step + i, settings)
            scores = token_scores(logits, new) if score else ()
            return (new, without_table(cache)), (new, scores)

        (_, pages), (tokens, scores) = jax.lax.scan(one, (token, pages), jnp.arange(n))
        return tokens, scores, pages

    def ride(params, pages, token, position, table, step, seeds, settings, emit):
        """decode's one step, the LM head and sampling on rows `emit` [E] only -> (tokens [E], pages)."""
        hidden, cache = model.apply(
            {"params": params}, token[:, None], positions=position[:, None], cache=with_table(pages, table)
        )
        logits = model.apply({"params": params}, hidden[emit], method=Transformer.logits)[:, 0]
        settings = tuple(x[emit] for x in settings)
        return sample_rows(logits, seeds[emit], step[emit], settings), without_table(cache)

    return prefill, decode, ride
