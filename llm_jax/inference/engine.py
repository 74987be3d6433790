"""Request batching for the server: a bounded queue and one thread that runs the model.

Static batching: the thread takes every waiting request (up to max_batch), pads the batch to a power
of two rows (so at most log2(max_batch) + 1 batch shapes compile per prompt bucket) and generates
until each row has finished; requests that arrive meanwhile wait for the next batch, at most one
batch's max_tokens steps. Memory is bounded by max_queue + max_batch requests of at most
seq_len tokens each. Each request reads its tokens from its own queue, from any thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

from llm_jax.inference.generate import Generator


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Request:
    ids: list[int]  # the prompt, already fitted to the context (prompt + max_new <= seq_len)
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # token ids, then None at the end
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0
    finish_reason: str | None = None  # "length" (budget spent) or "stop" (a stop id, or the reader stopped)
    error: str | None = None

    def tokens(self) -> Iterator[int]:
        """The new token ids as they come (the end-of-text / end-of-turn id is not included); on a
        failed generation they end early with `error` set."""
        while (tok := self.out.get()) is not None:
            yield tok


class Engine:
    def __init__(
        self, generator: Generator, stop_ids: tuple[int, ...], max_batch: int = 16, max_queue: int = 64, pad_id: int = 0
    ):
        self.generator, self.stop_ids, self.max_batch, self.pad_id = generator, stop_ids, max_batch, pad_id
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.batches = self.rows = 0  # counters for /health
        threading.Thread(target=self._serve_forever, name="llm_jax-engine", daemon=True).start()

    def submit(self, request: Request) -> Request:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None
        return request

    def _serve_forever(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled.is_set()]
            try:
                if batch:
                    self._generate(batch)
            except Exception as e:  # a bug or device error fails this batch's requests, not the server
                for r in batch:
                    if r.finish_reason is None:
                        r.error, r.finish_reason = f"generation failed: {type(e).__name__}: {e}", "error"
                        r.out.put(None)

    def _generate(self, batch: list[Request]) -> None:
        rows = 1 << (len(batch) - 1).bit_length()
        pad = rows - len(batch)  # idle rows: a one-token prompt with no budget
        columns = zip(
            *[(r.ids, r.max_new, r.temperature, r.top_k, r.top_p, r.seed) for r in batch],
            *[([self.pad_id], 0, 0.0, 0, 1.0, 0)] * pad,
        )
        self.batches, self.rows = self.batches + 1, self.rows + len(batch)
        steps = self.generator.stream_batch(*map(list, columns), stop_ids=self.stop_ids)
        for step in steps:
            for r, tok in zip(batch, step):
                if r.finish_reason is not None:
                    continue
                if tok is None or r.cancelled.is_set():
                    self._finish(r)
                else:
                    r.generated += 1
                    r.out.put(tok)
            if all(r.finish_reason is not None for r in batch):
                steps.close()
                break
        for r in batch:
            if r.finish_reason is None:
                self._finish(r)

    @staticmethod
    def _finish(r: Request) -> None:
        r.finish_reason = "length" if r.generated >= r.max_new else "stop"
        r.out.put(None)
