"""The server's scheduler: continuous batching over a paged KV cache (llm_jax/inference/paged.py).

One thread runs the model. Each round it admits waiting requests (first come, first served) while a
decode slot and the KV blocks for prompt + max_tokens are free; short prompts (up to `--ride-tokens`
in all) ride in the round's decode step as rows of their own, the others are prefilled apart, the next
chunk of each (chunks of `--prefill-chunk` tokens, so a long prompt never stalls the running rows for
more than a chunk); then one step of every running row. A request joins the batch the round its prompt
is prefilled and leaves the step it ends, freeing its slot and blocks. While nothing waits,
a round decodes up to 16 steps in one dispatch (DECODE_STEPS; no row past its budget), over the fewest
slots that hold every running row.

With `share_prefixes`, a prompt that begins as an earlier request's prompt and output did (a system
prompt, a few-shot preamble, a chat's earlier turns) takes those full KV blocks and prefills only the
rest (blocks.py); requests that want their prompt's log-probs (echo) are prefilled whole.

Memory is bounded: at most `max_queue` requests wait, and the KV cache is the fixed pool of blocks;
when blocks run out, new requests wait for running ones to end. `static=True` admits a new batch only
when every row has ended (static batching, for comparison: benchmarks/serve.py).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator

from llm_jax.inference.blocks import prefix_keys
from llm_jax.inference.paged import DECODE_STEPS, RIDERS, TOP_LOGPROBS, PagedModel, Scores

PREFILL_ROWS = 8  # prompts prefilled together in one round, at most


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Request:
    ids: list[int]  # the prompt, already fitted to the context (prompt + max_new <= seq_len)
    max_new: int  # 0: only score the prompt (echo)
    temperature: float
    top_k: int
    top_p: float
    seed: int
    logprobs: bool = False  # keep each new token's log-prob and top log-probs (`scores`)
    prompt_logprobs: bool = False  # and each prompt token's after the first (`prompt_scores`)
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # token ids, then None at the end
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0
    finish_reason: str | None = None  # "length" (budget spent) or "stop" (a stop id, or the reader stopped)
    error: str | None = None
    new_ids: list[int] = dataclasses.field(default_factory=list)  # the tokens put out so far
    scores: list = dataclasses.field(default_factory=list)  # per new token: (log-prob, [(id, log-prob)] * 20)
    prompt_scores: list = dataclasses.field(default_factory=list)  # per prompt token from the second on
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    # the scheduler's: KV blocks held and the prompt's block keys, prompt tokens prefilled, decode slot,
    # the newest token
    blocks: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)
    prefilled: int = 0
    slot: int | None = None
    last: int = 0  # the newest token, which the next decode step reads

    def tokens(self) -> Iterator[int]:
        """The new token ids as they come (the end-of-text / end-of-turn id is not included); on a
        failed generation they end early with `error` set. scores[i] is set before token i comes."""
        while (tok := self.out.get()) is not None:
            yield tok


def _entry(scores: Scores, *index) -> tuple[float, list[tuple[int, float]]]:
    top = zip(scores.top_ids[index].tolist(), scores.top_logprobs[index].tolist())
    return float(scores.logprob[index]), list(top)[:TOP_LOGPROBS]


class Engine:
    def __init__(
        self, model: PagedModel, stop_ids: tuple[int, ...], max_queue: int, static: bool, share_prefixes: bool
    ):
        self.model, self.stop_ids, self.max_queue, self.static = model, stop_ids, max_queue, static
        self.share_prefixes = share_prefixes
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.slots: list[Request | None] = [None] * model.rows
        self.wake = threading.Condition()
        self.stats = collections.Counter()  # requests, generated_tokens, prompt_tokens, shared_tokens, failed
        self.first_token_s: collections.deque[float] = collections.deque(maxlen=1000)
        self.closed = False
        self.thread = threading.Thread(target=self._serve_forever, name="llm_jax-engine", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Ends the engine thread once the requests it holds have finished (waiting ones are dropped)."""
        with self.wake:
            self.closed = True
            for r in self.waiting:
                r.error = "the server is shutting down"
                r.finish_reason = "error"
                r.out.put(None)
            self.waiting.clear()
            self.wake.notify()
        self.thread.join()

    # -- the request side (any thread) -----------------------------------------------------------
    def submit(self, request: Request) -> Request:
        need = self.model.blocks_for(len(request.ids) + request.max_new)
        if need > self.model.pool.capacity:
            shards = f" per batch shard ({self.model.shards})" if self.model.shards > 1 else ""
            raise ValueError(
                f"the request needs {need} KV blocks of {self.model.block} tokens; this server has "
                f"{self.model.pool.capacity}{shards} (--kv-blocks)"
            )
        with self.wake:
            if self.closed:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def load(self) -> dict:
        """Gauges for /health and /metrics."""
        return {
            "waiting": len(self.waiting),
            "prefilling": len(self.prefilling),
            "running": len(self._running()),
            "kv_blocks_used": self.model.pool.total - self.model.pool.free,
            "kv_blocks_shared_idle": self.model.pool.idle,
            "kv_blocks": self.model.pool.total,
        }

    # -- the engine thread -----------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or any(self.slots) or self.closed):
                    self.wake.wait()
                if self.closed and not any(self.slots):
                    return
            try:
                self._round()
            except Exception as e:  # a bug or device error fails the requests in flight, not the server
                for r in [*self.prefilling, *filter(None, self.slots)]:
                    self.stats["failed"] += 1
                    r.error = f"generation failed: {type(e).__name__}: {e}"
                    self._finish(r, "error")

    def _round(self) -> None:
        for r in [r for r in filter(None, self.slots) if r.cancelled.is_set()]:
            self._finish(r, "stop")
        self._admit()
        riders = self._riders()
        if apart := [r for r in self.prefilling if r not in riders]:
            self._prefill(apart[:PREFILL_ROWS])
        if riders and not any(r.logprobs for r in self._running()):  # one that just joined may want them
            self._ride(riders)
        elif self._running():
            self._decode()

    def _riders(self) -> list[Request]:
        """The prefilling requests whose whole remaining prompt rides in this round's decode step (paged.py:
        first come first, up to the model's `rides` tokens and RIDERS prompts; none while a request wants
        log-probs)."""
        riders, room = [], self.model.rides
        if any(r.logprobs for r in self._running()):  # a ride step scores no tokens
            return []
        for r in self.prefilling[:RIDERS]:
            left = len(r.ids) - r.prefilled
            if r.logprobs or r.prompt_logprobs or left > room:
                break
            riders.append(r)
            room -= left
        return riders

    def _running(self) -> list[Request]:
        """The rows that decode: in a slot, their prompt prefilled."""
        return [r for r in self.slots if r is not None and r.prefilled == len(r.ids)]

    def _admit(self) -> None:
        if self.static and any(self.slots):
            return
        with self.wake:
            while self.waiting and None in self.slots:
                r = self.waiting[0]
                if r.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                free = [s for s, held in enumerate(self.slots) if held is None]
                if self.share_prefixes and not r.keys:
                    r.keys = prefix_keys(r.ids, self.model.block)
                # at least the prompt's last token is prefilled (it samples the first new one); echo: all
                reusable = 0 if r.prompt_logprobs else (len(r.ids) - 1) // self.model.block
                placed = self.model.admit(free, len(r.ids) + r.max_new, r.keys[:reusable])
                if placed is None:  # the oldest waits for blocks; nobody overtakes it
                    return
                self.waiting.popleft()
                r.slot, r.blocks, shared = placed
                r.prefilled = shared * self.model.block
                self.stats["shared_tokens"] += r.prefilled
                self.slots[r.slot] = r
                self.prefilling.append(r)
                self.stats["requests"] += 1

    def _prefill(self, group: list[Request]) -> None:
        chunk = self.model.chunk
        chunks = []
        for r in group:
            start = r.prefilled
            ids = r.ids[start : start + chunk]
            targets = r.ids[start + 1 : start + 1 + len(ids)]
            chunks.append(
                {
                    "ids": ids,
                    "start": start,
                    "targets": targets + [0] * (len(ids) - len(targets)),
                    "table": self.model.table(r.blocks),
                    "seed": r.seed,
                    "settings": (r.temperature, r.top_k, r.top_p),
                }
            )
        score = any(r.logprobs or r.prompt_logprobs for r in group)
        first, first_scores, chunk_scores = self.model.prefill(chunks, score)
        for i, (r, c) in enumerate(zip(group, chunks)):
            if r.prompt_logprobs:
                scored = min(len(c["ids"]), len(r.ids) - 1 - c["start"])
                r.prompt_scores += [_entry(chunk_scores, i, j) for j in range(scored)]
            r.prefilled += len(c["ids"])
            self.stats["prompt_tokens"] += len(c["ids"])
            if r.prefilled < len(r.ids):
                continue
            self._prefilled(r, int(first[i]), first_scores and _entry(first_scores, i))

    def _prefilled(self, r: Request, first: int, scores) -> None:
        self.prefilling.remove(r)
        self.model.pool.share(r.blocks, r.keys)
        if r.max_new == 0:
            self._finish(r, "length")
        else:
            self.first_token_s.append(time.perf_counter() - r.submitted)
            self._emit(r, first, scores)

    def _rows(self, running: list[Request], width: int) -> dict:
        """The decode inputs of `width` rows, the running requests' at their slots, the rest idle."""
        rows = {
            "token": [0] * width,
            "position": [-1] * width,
            "table": [[]] * width,  # block lists (the caller makes them tables)
            "step": [0] * width,
            "seed": [0] * width,
            "settings": [[0.0] * width, [0] * width, [1.0] * width],
        }
        for r in running:
            self._place(rows, r.slot, r, r.last, len(r.ids) + r.generated - 1, r.generated)
        return rows

    @staticmethod
    def _place(rows: dict, at: int, r: Request, token: int, position: int, step: int) -> None:
        rows["token"][at], rows["position"][at], rows["table"][at] = token, position, r.blocks
        rows["step"][at], rows["seed"][at] = step, r.seed
        for k, value in enumerate((r.temperature, r.top_k, r.top_p)):
            rows["settings"][k][at] = value

    def _ride(self, riders: list[Request]) -> None:
        """One decode step of the running rows with the riders' remaining prompt tokens as rows of their own;
        each rider's last prompt row samples its first token."""
        running = self._running()
        used = self.model.decode_rows(1 + max(r.slot for r in running)) if running else 0
        prompt = [(r, i) for r in riders for i in range(r.prefilled, len(r.ids))]
        rows = self._rows(running, self.model.ride_rows(used + len(prompt)))
        for at, (r, i) in enumerate(prompt, start=used):
            self._place(rows, at, r, r.ids[i], i, 0)
        rows["table"] = [self.model.table(t) for t in rows["table"]]
        lasts = [(r, used + k) for k, (r, i) in enumerate(prompt) if i == len(r.ids) - 1]  # rider, its last row
        tokens = self.model.ride(rows, [r.slot for r in running] + [row for _, row in lasts])
        for (r, _), token in zip(lasts, tokens[len(running) :]):
            self.stats["prompt_tokens"] += len(r.ids) - r.prefilled
            r.prefilled = len(r.ids)
            self._prefilled(r, int(token), None)
        for r, token in zip(running, tokens):
            self._emit(r, int(token), None)

    def _decode(self) -> None:
        running = self._running()
        left = min(r.max_new - r.generated for r in running)
        if self.waiting and None in self.slots and not self.static:
            left = 1  # someone can join next round
        steps = max(s for s in DECODE_STEPS if s <= left)  # no row decodes past its budget
        slots = self._rows(running, self.model.decode_rows(1 + max(r.slot for r in running)))
        slots["table"] = [self.model.table(t) for t in slots["table"]]
        tokens, scores = self.model.decode(slots, steps, any(r.logprobs for r in running))
        for t in range(steps):
            for r in running:
                if r.finish_reason is None:
                    self._emit(r, int(tokens[t, r.slot]), scores and _entry(scores, t, r.slot))

    def _emit(self, r: Request, token: int, scores) -> None:
        if r.cancelled.is_set():
            return self._finish(r, "stop")
        if token in self.stop_ids:
            return self._finish(r, "stop")
        r.generated, r.last = r.generated + 1, token
        self.stats["generated_tokens"] += 1
        if r.logprobs:
            r.scores.append(scores)
        r.new_ids.append(token)
        r.out.put(token)
        if r.generated >= r.max_new:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        if self.share_prefixes and reason != "error" and r.prefilled == len(r.ids):
            # every position but the last new token's is written: the next turn of a chat begins alike
            self.model.pool.share(r.blocks, prefix_keys(r.ids + r.new_ids[:-1], self.model.block))
        if r in self.prefilling:
            self.prefilling.remove(r)
        if r.slot is not None:
            self.slots[r.slot] = None
        self.model.pool.give(r.blocks)
        r.blocks, r.slot, r.finish_reason = [], None, reason
        r.out.put(None)
