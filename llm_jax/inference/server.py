"""`llm-jax serve`: an OpenAI-compatible HTTP server for a run (standard library only).

Endpoints: POST /v1/completions, POST /v1/chat/completions (the chat template of
llm_jax/data/chat_template.py), both with "stream": true as server-sent events; GET /v1/models;
GET /health. Requests go through the batching engine (llm_jax/inference/engine.py). Errors are
OpenAI-shaped, {"error": {"message", "type", "param", "code"}}, with a 4xx status; the server keeps
serving after any of them.

Sampling fields: max_tokens (or max_completion_tokens; default 16 for completions, the rest of
the context up to --max-tokens for chat), temperature (default 1), top_p, top_k (an extension;
0 = off), seed (default: random), stop (a string or up to 4), n (only 1). A prompt that does not
fit the context with its max_tokens is refused (code context_length_exceeded), never cut.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from llm_jax.config import Config, MeshConfig
from llm_jax.data.chat_template import ROLES, check_messages, prompt_ids
from llm_jax.errors import UserError
from llm_jax.inference.engine import Engine, QueueFull, Request
from llm_jax.inference.generate import Generator, stream_text
from llm_jax.parallel.sharding import Layout, check_fit, make_layout, parse_meshes
from llm_jax.run import load_run

MAX_BODY = 1 << 20  # bytes of a request body


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
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": _usage(request),
        }

    def chunk(self, rid: str, chat: bool, text: str | None = None, finish: str | None = None, first=False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
        }


def _usage(request: Request) -> dict:
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    service: Service
    api_key: str | None = None

    def do_GET(self):
        self._dispatch({"/health": self.service.health, "/v1/models": self.service.models})

    def do_POST(self):
        self._dispatch(
            {
                "/v1/completions": lambda: self._complete(chat=False),
                "/v1/chat/completions": lambda: self._complete(chat=True),
            }
        )

    def _dispatch(self, routes: dict) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path not in routes:
                raise ApiError(404, f"no endpoint {self.command} {self.path}", code="not_found")
            if self.api_key and path != "/health" and self.headers.get("Authorization") != f"Bearer {self.api_key}":
                raise ApiError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
            result = routes[path]()
            if result is not None:
                self._json(200, result)
        except ApiError as e:
            self._json(e.status, e.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a JSON body with a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {int(length):,} bytes; the limit is {MAX_BODY:,}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    def _complete(self, chat: bool) -> dict | None:
        body = self._body()
        request, stop = self.service.parse(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        pieces = self.service.run(request, stop)
        if not body.get("stream"):
            text = "".join(pieces)
            if request.error:
                raise ApiError(500, request.error, kind="server_error")
            return self.service.response(request, text, chat, rid)
        first = next(pieces, None)  # a full queue raises here, before any header is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if chat:
                self._event(self.service.chunk(rid, chat, first=True))
            if first:
                self._event(self.service.chunk(rid, chat, first))
            for piece in pieces:
                self._event(self.service.chunk(rid, chat, piece))
            if request.error:
                self._event(ApiError(500, request.error, kind="server_error").body)
            else:
                self._event(self.service.chunk(rid, chat, finish=request.finish_reason))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event(self.service.chunk(rid, chat) | {"choices": [], "usage": _usage(request)})
            self._send_chunk(b"data: [DONE]\n\n")
            self._send_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):  # the client went away: stop generating for it
            pieces.close()
            with self.service.lock:
                self.service.cancelled += 1
            self.close_connection = True
        return None

    def _event(self, obj: dict) -> None:
        self._send_chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)


def serve_layout(cfg: Config, mesh: str) -> Layout | None:
    """--mesh 'data,fsdp,tensor' -> a Layout over the first data x fsdp x tensor of this host's devices,
    with the run's rules (None for 1,1,1: one device)."""
    layouts = parse_meshes(mesh)
    if len(layouts) != 1 or layouts[0][3:] != (1, 0):
        raise UserError(f"--mesh {mesh!r}: give one layout data,fsdp,tensor (no pipeline stages when serving)")
    data, fsdp, tensor = layouts[0][:3]
    if (data, fsdp, tensor) == (1, 1, 1):
        return None
    devices = jax.local_devices()
    if data * fsdp * tensor > len(devices):
        raise UserError(f"--mesh {mesh} needs {data * fsdp * tensor} devices; this host has {len(devices)}")
    layout = make_layout(
        MeshConfig(data=data, pipeline=1, fsdp=fsdp, tensor=tensor, dcn_data=1, rules=cfg.mesh.rules, microbatches=0),
        devices[: data * fsdp * tensor],
    )
    check_fit(dict(layout.mesh.shape), layout.rules, cfg.model, layout.axis_size("batch"))
    return layout


def serve(
    run_dir: str,
    host: str,
    port: int,
    model_name: str | None,
    max_tokens: int,
    max_batch: int,
    max_queue: int,
    api_key: str | None,
    mesh: str = "1,1,1",
    ready=print,
) -> None:
    run = load_run(run_dir)
    cfg = run.cfg
    name = model_name or run.path.resolve().name
    service = Service(cfg, run.params, run.tokenizer, name, max_tokens, max_batch, max_queue, serve_layout(cfg, mesh))
    service.warm_up()
    handler = type("BoundHandler", (Handler,), {"service": service, "api_key": api_key})
    try:
        httpd = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one)"
        ) from None
    httpd.daemon_threads = True
    weights = "float" if cfg.model.quant == "none" else cfg.model.quant
    ready(
        f"serving {run_dir} ({run.step} steps, {weights} weights, mesh {mesh}) as '{name}' on "
        f"http://{host}:{httpd.server_address[1]}/v1 (context {cfg.model.seq_len}, max_tokens {service.max_tokens}, "
        f"batch {max_batch}, queue {max_queue})",
        flush=True,
    )
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
