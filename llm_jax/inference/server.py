"""`llm-jax serve`: an OpenAI-compatible HTTP server for a run, on uvicorn and starlette.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the chat template of
llm_jax/data/chat_template.py), both with "stream": true as server-sent events; GET /v1/models,
/health, /metrics (Prometheus text) and /openapi.json; and vLLM's GET /tokenizer_info, POST /tokenize
and /detokenize, which lm-evaluation-harness's `local-completions` model uses with
`tokenizer_backend=remote`. Requests become engine jobs in llm_jax/inference/openai_api.py (the fields
are listed there), scheduled by llm_jax/inference/engine.py.
Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}, with a 4xx status; the
server keeps serving after any of them, on the same keep-alive connection. A body over MAX_BODY bytes
gets 413. On SIGTERM or Ctrl-C the server stops listening, answers 503 to new requests on open
connections, lets running requests finish (up to GRACE_S) and exits.
"""

from __future__ import annotations

import json
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.inference.api_fields import ApiError
from llm_jax.inference.openai_api import Service
from llm_jax.parallel.sharding import inference_layout
from llm_jax.run import load_config_of, load_run

MAX_BODY = 1 << 20  # bytes of a request body
DRAIN_LIMIT = 16 << 20  # a larger body is not read to its end: its connection closes
GRACE_S = 30  # how long running requests may take to finish after SIGTERM
KEEP_ALIVE_S = 30  # an idle keep-alive connection is closed after this long


def app(service: Service, api_key: str | None) -> Starlette:
    """The ASGI application over a Service."""

    async def guarded(request: Request, handler) -> Response:
        try:
            if service.draining:
                raise ApiError(503, "the server is shutting down; retry on another replica", kind="server_error")
            if (
                api_key
                and request.url.path != "/health"
                and request.headers.get("authorization") != f"Bearer {api_key}"
            ):
                raise ApiError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
            return await handler(request)
        except ApiError as e:
            return JSONResponse(e.body, e.status)

    async def complete(request: Request, chat: bool) -> Response:
        body = await _json_body(request)
        job = service.parse(body, chat)
        await run_in_threadpool(service.submit, job)
        if not body.get("stream"):
            return JSONResponse(await run_in_threadpool(service.response, job))

        async def events():
            try:
                async for chunk in iterate_in_threadpool(service.stream(job)):
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the stream ended): free any row still generating
                if any(r.finish_reason is None for r in job.requests):
                    with service.lock:
                        service.cancelled += 1
                for r in job.requests:
                    r.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def metrics(_request: Request) -> Response:
        return PlainTextResponse(prometheus(service), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, _exc) -> Response:
        error = ApiError(404, f"no endpoint {request.method} {request.url.path}", code="not_found")
        return JSONResponse(error.body, error.status)

    def route(path, handler, method):
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)

        return Route(path, endpoint, methods=[method])

    return Starlette(
        routes=[
            route("/v1/completions", lambda r: complete(r, chat=False), "POST"),
            route("/v1/chat/completions", lambda r: complete(r, chat=True), "POST"),
            route("/v1/models", _json_of(service.models), "GET"),
            route("/health", _json_of(service.health), "GET"),
            route("/metrics", metrics, "GET"),
            route("/openapi.json", _json_of(lambda: OPENAPI), "GET"),
            route("/tokenizer_info", _json_of(service.tokenizer_info), "GET"),
            route("/tokenize", lambda r: _json_call(r, service.tokenize), "POST"),
            route("/detokenize", lambda r: _json_call(r, service.detokenize), "POST"),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )


def _json_of(make):
    async def handler(_request: Request) -> Response:
        return JSONResponse(make())

    return handler


async def _json_call(request: Request, handle) -> Response:
    return JSONResponse(handle(await _json_body(request)))


async def _json_body(request: Request):
    """The body as JSON; over MAX_BODY bytes it is read to its end (up to DRAIN_LIMIT) and refused with
    413, so that the keep-alive connection stays usable."""
    raw, size = bytearray(), 0
    try:
        async for part in request.stream():
            size += len(part)
            if size <= MAX_BODY:
                raw += part
            elif size > DRAIN_LIMIT:
                break  # not worth reading: uvicorn closes the connection after the answer
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the whole body") from None
    if size > MAX_BODY:
        raise ApiError(413, f"the request body is over the limit of {MAX_BODY:,} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None


def prometheus(service: Service) -> str:
    """The engine's gauges and counters in Prometheus' text format."""
    load, stats = service.engine.load(), service.engine.stats
    firsts = sorted(service.engine.first_token_s)
    lines = []

    def metric(name, kind, help_, value, labels=""):
        lines.extend(
            [f"# HELP llm_jax_{name} {help_}", f"# TYPE llm_jax_{name} {kind}", f"llm_jax_{name}{labels} {value}"]
        )

    metric("requests_waiting", "gauge", "requests queued for a decode slot and KV blocks", load["waiting"])
    metric("requests_prefilling", "gauge", "requests whose prompt is being prefilled", load["prefilling"])
    metric("requests_running", "gauge", "rows decoding", load["running"])
    metric("kv_blocks_used", "gauge", "KV-cache blocks held by requests", load["kv_blocks_used"])
    metric("kv_blocks_total", "gauge", "KV-cache blocks in the pool", load["kv_blocks"])
    metric("kv_blocks_shared_idle", "gauge", "free blocks kept for prompts alike", load["kv_blocks_shared_idle"])
    metric("requests_total", "counter", "requests admitted", stats["requests"])
    metric("requests_failed_total", "counter", "requests ended by a generation error", stats["failed"])
    metric("requests_cancelled_total", "counter", "streams whose client went away", service.cancelled)
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", stats["prompt_tokens"])
    metric("prompt_tokens_shared_total", "counter", "prompt tokens read from shared blocks", stats["shared_tokens"])
    metric("generation_tokens_total", "counter", "tokens generated", stats["generated_tokens"])
    lines += [
        "# HELP llm_jax_time_to_first_token_seconds time from submission to the first new token (last 1000)",
        "# TYPE llm_jax_time_to_first_token_seconds summary",
    ]
    for q in (0.5, 0.99):
        value = firsts[min(len(firsts) - 1, int(q * len(firsts)))] if firsts else float("nan")
        lines.append(f'llm_jax_time_to_first_token_seconds{{quantile="{q}"}} {value}')
    lines += [
        f"llm_jax_time_to_first_token_seconds_sum {sum(firsts)}",
        f"llm_jax_time_to_first_token_seconds_count {len(firsts)}",
    ]
    return "\n".join(lines) + "\n"


_ERROR = {"description": "an OpenAI-shaped error: {error: {message, type, param, code}}"}
OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "llm_jax OpenAI-compatible server", "version": "1"},
    "paths": {
        "/v1/completions": {
            "post": {
                "summary": "text completion (fields: llm_jax/inference/openai_api.py)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "text_completion, or server-sent events"}, "4XX": _ERROR},
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "chat completion through the run's chat template",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "chat.completion, or server-sent events"}, "4XX": _ERROR},
            }
        },
        "/v1/models": {"get": {"summary": "the served model", "responses": {"200": {"description": "a model list"}}}},
        "/health": {"get": {"summary": "status and load", "responses": {"200": {"description": "ok"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
        "/tokenize": {"post": {"summary": "text -> token ids", "responses": {"200": {"description": "tokens"}}}},
        "/detokenize": {"post": {"summary": "token ids -> text", "responses": {"200": {"description": "prompt"}}}},
    },
}


def engine_options(
    cfg: Config,
    max_batch: int,
    max_queue: int,
    kv_blocks: int,
    block: int,
    chunk: int,
    static: bool,
    rides: int,
    share_prefixes: bool,
    shards: int = 1,
) -> dict:
    """The serve command's engine flags, checked against the run and the mesh's batch shards (each holds
    its share of the pool, and a request's blocks come from one shard) -> Service's `engine` dict."""
    seq_len = cfg.model.seq_len
    if seq_len % block:
        raise UserError(f"--kv-block-size {block} must divide the model's context {seq_len}")
    per_row = seq_len // block
    blocks = kv_blocks or -(-max_batch // shards) * shards * per_row  # every row a full context
    if -(-blocks // shards) < per_row:
        split = f" split over {shards} batch shards" if shards > 1 else ""
        raise UserError(
            f"--kv-blocks {blocks}{split} cannot hold one full context ({per_row} blocks of {block}) per shard; "
            "raise it"
        )
    return {
        "rows": max_batch,
        "blocks": blocks + 1,
        "block": block,
        "chunk": chunk,
        "rides": rides,
        "max_queue": max_queue,
        "static": static,
        "share_prefixes": share_prefixes,
    }


class _Server(uvicorn.Server):
    """uvicorn's server, telling the service when shutdown starts (new requests then get 503)."""

    def __init__(self, config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame):
        self.service.draining = True
        super().handle_exit(sig, frame)


def serve(run_dir: str, host: str, port: int, model_name: str | None, max_tokens: int, api_key: str | None,
          mesh: str, engine: dict, ready=print) -> None:  # fmt: skip
    cfg = load_config_of(run_dir)
    layout = inference_layout(cfg, mesh)
    options = engine_options(cfg, **engine, shards=layout.axis_size("batch") if layout else 1)  # before loading
    run = load_run(run_dir, layout, inference=True)
    name = model_name or run.path.resolve().name
    service = Service(cfg, run.params, run.tokenizer, name, max_tokens, options, layout)
    service.warm_up()
    config = uvicorn.Config(
        app(service, api_key),
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACE_S,
        backlog=2048,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one)"
        ) from None
    sock.listen(config.backlog)
    weights = "float" if cfg.model.quant == "none" else cfg.model.quant
    mode = "static" if options["static"] else "continuous"
    ready(
        f"serving {run_dir} ({run.step} steps, {weights} weights, mesh {mesh}) as '{name}' on "
        f"http://{host}:{sock.getsockname()[1]}/v1 (context {cfg.model.seq_len}, max_tokens {service.max_tokens}, "
        f"{mode} batching of {options['rows']} rows, {options['blocks'] - 1} KV blocks of {options['block']}, "
        f"queue {options['max_queue']})",
        flush=True,
    )
    try:
        _Server(config, service).run(sockets=[sock])
    finally:
        service.engine.close()
