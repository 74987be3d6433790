"""`llm-jax serve`: an OpenAI-compatible HTTP server for a run (standard library only).

Endpoints: POST /v1/completions, POST /v1/chat/completions (the chat template of
llm_jax/data/chat_template.py), both with "stream": true as server-sent events; GET /v1/models;
GET /health. Requests become engine requests in llm_jax/inference/openai_api.py (the sampling
fields are listed there) and are batched by llm_jax/inference/engine.py. Errors are OpenAI-shaped,
{"error": {"message", "type", "param", "code"}}, with a 4xx status; the server keeps serving after
any of them.
"""

from __future__ import annotations

import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from llm_jax.config import Config, MeshConfig
from llm_jax.errors import UserError
from llm_jax.inference.openai_api import ApiError, Service, usage
from llm_jax.parallel.sharding import Layout, check_fit, make_layout, parse_meshes
from llm_jax.run import load_run

MAX_BODY = 1 << 20  # bytes of a request body


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
                self._event(self.service.chunk(rid, chat) | {"choices": [], "usage": usage(request)})
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
