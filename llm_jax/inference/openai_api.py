"""The OpenAI API over the batching engine, without HTTP: request bodies -> engine requests
(validated, with OpenAI-shaped errors) and engine tokens -> completion / chat objects and stream
chunks. llm_jax/inference/server.py puts it behind HTTP.

Sampling fields: max_tokens (or max_completion_tokens; default 16 for completions, the rest of
the context up to --max-tokens for chat), temperature (default 1), top_p, top_k (an extension;
0 = off), seed (default: random), stop (a string or up to 4), n (only 1). A prompt that does not
fit the context with its max_tokens is refused (code context_length_exceeded), never cut.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

from llm_jax.data.chat_template import ROLES, check_messages, prompt_ids
from llm_jax.errors import UserError
from llm_jax.inference.engine import Engine, QueueFull, Request
from llm_jax.inference.generate import Generator, stream_text


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Service:
    """Turns OpenAI request bodies into engine requests and engine tokens into response objects."""

    def __init__(
        self, cfg, params, tokenizer, model_name: str, max_tokens: int, max_batch: int, max_queue: int, layout=None
    ):
        self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
        self.seq_len, self.max_tokens = cfg.model.seq_len, min(max_tokens, cfg.model.seq_len - 1)
        self.created = int(time.time())
        _, self.chat_stop_ids = prompt_ids(tokenizer, [{"role": "user", "content": ""}])  # checks the chat tokens
        self.engine = Engine(
            Generator(cfg.model, params, layout), self.chat_stop_ids, max_batch, max_queue, tokenizer.eos_id
        )
        self.cancelled, self.lock = 0, threading.Lock()  # streams whose client went away

    def warm_up(self) -> None:
        """Compiles the batch-1 prefill and decode before the first request."""
        request = self.engine.submit(Request([self.tokenizer.eos_id], 2, 0.0, 0, 1.0, 0))
        list(request.tokens())

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llm_jax",
                    "context_length": self.seq_len,
                }
            ],
        }

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "waiting": self.engine.waiting.qsize(),
            "batches": self.engine.batches,
            "requests": self.engine.rows,
            "cancelled": self.cancelled,
        }

    def parse(self, body, chat: bool) -> tuple[Request, list[str]]:
        """A validated request body -> (engine request, stop strings); raises ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise ApiError(400, "missing required field 'model'", "model", "missing_required_parameter")
        if model != self.model_name:
            raise ApiError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}' (GET /v1/models)",
                "model",
                "model_not_found",
            )
        _integer(body, "n", 1, 1, 1, "one choice per request on this server")
        ids = self._chat_prompt(body) if chat else self._text_prompt(body)
        default = min(self.max_tokens, self.seq_len - len(ids)) if chat else min(16, self.max_tokens)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_new = _integer(
            body, key, default, 1, self.max_tokens, f"at most {self.max_tokens} new tokens per request on this server"
        )
        if len(ids) + max_new > self.seq_len:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.seq_len} tokens; the request needs "
                f"{len(ids) + max_new} ({len(ids)} in the prompt, {max_new} for the completion): "
                f"shorten the prompt or lower {key}",
                key,
                "context_length_exceeded",
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4", "stop")
        seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
        request = Request(
            ids,
            max_new,
            _number(body, "temperature", 1.0, 0.0, 2.0),
            _integer(body, "top_k", 0, 0, None),
            _number(body, "top_p", 1.0, 1e-9, 1.0),
            secrets.randbits(32) if seed is None else seed % 2**32,
        )
        return request, stop

    def _text_prompt(self, body) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(
                400,
                "'prompt' must be a string (or a list of one string)",
                "prompt",
                None if "prompt" in body else "missing_required_parameter",
            )
        return [self.tokenizer.eos_id] + self.tokenizer.encode(prompt)  # a fresh document, as in pretraining

    def _chat_prompt(self, body) -> list[int]:
        messages = body.get("messages")
        if isinstance(messages, list):  # OpenAI's newer shapes: "developer" role, content as a list of text parts
            messages = [_plain_message(m) for m in messages]
        try:
            check_messages(messages, "messages")
        except UserError as e:
            raise ApiError(
                400, str(e), "messages", None if "messages" in body else "missing_required_parameter"
            ) from None
        return prompt_ids(self.tokenizer, messages, self.cfg.sample.system)[0]

    def run(self, request: Request, stop: list[str]) -> Iterator[str]:
        """Submits the request and yields its text pieces; request.finish_reason is set at the end."""
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", code="queue_full", kind="rate_limit_error") from None
        exhausted = []

        def tokens():
            yield from request.tokens()
            exhausted.append(True)

        try:
            yield from stream_text(self.tokenizer, tokens(), stop)
        finally:
            if not exhausted:  # a stop string ended the text, or the client went away: free the row
                request.cancelled.set()
                request.finish_reason = request.finish_reason or "stop"

    def response(self, request: Request, text: str, chat: bool, rid: str) -> dict:
        choice = {"index": 0, "finish_reason": request.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return self._envelope(rid, "chat.completion" if chat else "text_completion", choice) | {"usage": usage(request)}

    def chunk(self, rid: str, chat: bool, text: str | None = None, finish: str | None = None, first=False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._envelope(rid, "chat.completion.chunk" if chat else "text_completion", choice)

    def _envelope(self, rid: str, kind: str, choice: dict) -> dict:
        """What every completion object and stream chunk carries around its one choice."""
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name, "choices": [choice]}


def usage(request: Request) -> dict:
    return {
        "prompt_tokens": len(request.ids),
        "completion_tokens": request.generated,
        "total_tokens": len(request.ids) + request.generated,
    }


def _plain_message(m):
    if not isinstance(m, dict):
        return m
    m = dict(m, role="system" if m.get("role") == "developer" else m.get("role"))
    if isinstance(m.get("content"), list):
        parts = m["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise ApiError(400, 'only text content parts ({"type": "text", "text": ...}) are supported', "messages")
        m["content"] = "".join(p["text"] for p in parts)
    if m.get("role") not in ROLES:
        raise ApiError(400, f"unsupported role {m.get('role')!r}: use system, user or assistant", "messages")
    return m


def _number(body: dict, key: str, default, lo: float, hi: float | None, integer: bool = False, hint: str = ""):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < lo or (hi is not None and value > hi):
        want = "an integer" if integer else "a number"
        bounds = f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
        raise ApiError(400, f"'{key}' must be {want}{bounds}, got {value!r}" + (f" ({hint})" if hint else ""), key)
    return value


def _integer(body: dict, key: str, default, lo: int, hi: int | None, hint: str = ""):
    return _number(body, key, default, lo, hi, integer=True, hint=hint)
