"""The OpenAI API over the engine, without HTTP: request bodies -> engine requests (validated, with
OpenAI-shaped errors) and engine tokens -> completion / chat objects and stream chunks.
llm_jax/inference/server.py puts it behind HTTP.

Fields: max_tokens (or max_completion_tokens; default 16 for completions, the rest of the context up
to --max-tokens for chat; 0 with echo: score the prompt only), temperature (default 1), top_p, top_k
(an extension; 0 = off), seed (default: random; choice i of n uses seed + i), stop (a string or up to
4), n (up to 16 choices), logprobs (completions: the top 0-20 alternatives per token; chat: true, with
top_logprobs 0-20), echo (completions: the prompt before the completion, with its tokens' log-probs),
stream with stream_options.include_usage. A completions prompt is a string, a list of token ids, or a
list of either (one choice per prompt and n). Log-probs are the model's own (before temperature and
filters); prompts start with the tokenizer's BOS (<|endoftext|> here) as documents do in
pretraining, so the first prompt token has a log-prob too. A prompt that does not fit the context
with its max_tokens is refused (code context_length_exceeded), never cut.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Iterator

from llm_jax.data.chat_template import check_messages, prompt_ids
from llm_jax.data.tokenizer import CHAT_TOKENS
from llm_jax.errors import UserError
from llm_jax.inference.api_fields import ApiError, flag, integer, is_ids, number, plain_message
from llm_jax.inference.engine import PREFILL_ROWS, Engine, QueueFull, Request
from llm_jax.inference.generate import text_pieces
from llm_jax.inference.paged import TOP_LOGPROBS, PagedModel

MAX_CHOICES = 16  # n x prompts per request


@dataclasses.dataclass
class Job:
    """One API request: its choices' engine requests (choice i = requests[i]) and how to answer."""

    chat: bool
    requests: list[Request]
    stop: list[str]
    top: int | None  # alternatives listed per token; None: no log-probs
    echo: bool
    stream_usage: bool
    rid: str  # the id every object of the answer carries


@dataclasses.dataclass
class Choice:
    """A finished (or streamed) choice: its text and the tokens it covers."""

    text: str = ""
    tokens: int = 0
    stopped: bool = False  # ended by a stop string before the engine ended it


class Service:
    """Turns OpenAI request bodies into engine requests and engine tokens into response objects."""

    def __init__(self, cfg, params, tokenizer, model_name: str, max_tokens: int, engine: dict, layout=None):
        """engine: PagedModel's rows, blocks, block, chunk and rides, and Engine's max_queue, static and
        share_prefixes (server.engine_options)."""
        self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
        self.seq_len, self.max_tokens = cfg.model.seq_len, min(max_tokens, cfg.model.seq_len - 1)
        self.created = int(time.time())
        # a base model without a chat format serves completions only
        self.chat = bool(tokenizer.chat_template) or all(tokenizer.piece_id(t) is not None for t in CHAT_TOKENS)
        stop_ids = prompt_ids(tokenizer, [{"role": "user", "content": ""}])[1] if self.chat else tokenizer.stop_ids
        model = PagedModel(
            cfg.model,
            params,
            layout,
            engine["rows"],
            engine["blocks"],
            engine["block"],
            engine["chunk"],
            engine["rides"],
        )
        self.engine = Engine(model, stop_ids, engine["max_queue"], engine["static"], engine["share_prefixes"])
        self.cancelled, self.lock = 0, threading.Lock()  # streams whose client went away
        self.draining = False  # set on shutdown: new requests get 503

    def warm_up(self) -> None:
        """Compiles every prefill and decode shape before the first request (log-probs' compile on first use)."""
        self.engine.model.warm_up(PREFILL_ROWS)

    def models(self) -> dict:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llm_jax"}
        return {"object": "list", "data": [model | {"context_length": self.seq_len}]}

    def health(self) -> dict:
        stats = self.engine.stats
        return (
            {"status": "draining" if self.draining else "ok", "model": self.model_name}
            | self.engine.load()
            | {
                "requests": stats["requests"],
                "generated_tokens": stats["generated_tokens"],
                "cancelled": self.cancelled,
            }
        )

    # -- the tokenizer, as vLLM's server shows it (lm-evaluation-harness's tokenizer_backend=remote) -----
    def tokenizer_info(self) -> dict:
        tok = self.tokenizer
        bos = tok.bos_token if tok.bos_id != tok.eos_id else None
        kind = "sentencepiece" if tok.path.suffix == ".model" else "tokenizers"
        return {"tokenizer_class": kind, "eos_token": tok.eos_token, "bos_token": bos, "pad_token": None}

    def tokenize(self, body) -> dict:
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        tokens = self.tokenizer.encode_with_specials(text)  # a special token's text: the token itself
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.seq_len}

    def detokenize(self, body) -> dict:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not (is_ids(tokens) or tokens == []) or any(t >= self.cfg.model.vocab_size or t < 0 for t in tokens):
            raise ApiError(400, "'tokens' must be a list of token ids", "tokens")
        return {"prompt": self.tokenizer.decode(tokens)}

    # -- requests -> engine requests --------------------------------------------------------------
    def parse(self, body, chat: bool) -> Job:
        """A validated request body -> its Job; raises ApiError."""
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
        prompts = [self._chat_prompt(body)] if chat else self._text_prompts(body)
        n = integer(body, "n", 1, 1, MAX_CHOICES // len(prompts), f"at most {MAX_CHOICES} choices x prompts")
        echo = not chat and flag(body, "echo")
        top = self._top_asked(body, chat)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        longest = max(map(len, prompts))
        default = min(self.max_tokens, self.seq_len - longest) if chat else min(16, self.max_tokens)
        hint = f"at most {self.max_tokens} new tokens per request on this server"
        max_new = integer(body, key, default, 0 if echo else 1, self.max_tokens, hint)
        if longest + max_new > self.seq_len:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.seq_len} tokens; the request needs "
                f"{longest + max_new} ({longest} in the prompt, {max_new} for the completion): "
                f"shorten the prompt or lower {key}",
                key,
                "context_length_exceeded",
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4", "stop")
        seed = integer(body, "seed", None, -(2**63), 2**64 - 1)
        seed = secrets.randbits(32) if seed is None else seed % 2**32
        sampling = (
            number(body, "temperature", 1.0, 0.0, 2.0),
            integer(body, "top_k", 0, 0, None),
            number(body, "top_p", 1.0, 1e-9, 1.0),
        )
        scored = top is not None
        requests = [
            Request(ids, max_new, *sampling, (seed + i) % 2**32, logprobs=scored, prompt_logprobs=echo and scored)
            for ids in prompts
            for i in range(n)
        ]
        usage = (body.get("stream_options") or {}).get("include_usage") is True
        return Job(chat, requests, stop, top, echo, usage, f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}")

    def _top_asked(self, body, chat: bool) -> int | None:
        if chat:
            if not flag(body, "logprobs"):
                if body.get("top_logprobs") is not None:
                    raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
                return None
            return integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
        return integer(body, "logprobs", None, 0, TOP_LOGPROBS)

    def _text_prompts(self, body) -> list[list[int]]:
        """'prompt': a string, token ids, or a list of either -> one id list per prompt, each after
        the tokenizer's BOS (<|endoftext|> in runs trained here: a fresh document, as in pretraining)."""
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and not is_ids(prompt) else [prompt]
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append([self.tokenizer.bos_id] + self.tokenizer.encode(p))
            elif is_ids(p) and all(0 <= t < self.cfg.model.vocab_size for t in p):
                out.append([self.tokenizer.bos_id] + list(p))
            else:
                raise ApiError(
                    400,
                    "'prompt' must be a string, a list of token ids (each in [0, vocab size)), or a list of these",
                    "prompt",
                    None if "prompt" in body else "missing_required_parameter",
                )
        if len(out) > MAX_CHOICES:
            raise ApiError(400, f"at most {MAX_CHOICES} prompts per request", "prompt")
        return out

    def _chat_prompt(self, body) -> list[int]:
        if not self.chat:
            raise ApiError(
                400,
                "this model has no chat template (a base model): POST /v1/completions serves it; "
                "for chat, fine-tune it first (llm-jax import-hf --chat-tokens, then train.objective=sft)",
                "messages",
            )
        messages = body.get("messages")
        if isinstance(messages, list):  # OpenAI's newer shapes: "developer" role, content as a list of text parts
            messages = [plain_message(m) for m in messages]
        try:
            check_messages(messages, "messages")
        except UserError as e:
            raise ApiError(
                400, str(e), "messages", None if "messages" in body else "missing_required_parameter"
            ) from None
        return prompt_ids(self.tokenizer, messages, self.cfg.sample.system)[0]

    # -- engine tokens -> answers ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queues every choice of the job, or none (429 when the queue is full)."""
        done = []
        try:
            for r in job.requests:
                done.append(self.engine.submit(r))
        except (QueueFull, ValueError) as e:
            for r in done:
                r.cancelled.set()
            if isinstance(e, ValueError):
                raise ApiError(400, str(e), "max_tokens") from None
            raise ApiError(429, f"the server is busy: {e}", code="queue_full", kind="rate_limit_error") from None

    def pieces(self, job: Job, request: Request, choice: Choice) -> Iterator[str]:
        """The text of one choice as it comes; `choice` keeps the text and the tokens covered so far.
        Cancels the request when the text ends early (a stop string) or the reader goes away."""
        exhausted = []

        def tokens():
            yield from request.tokens()
            exhausted.append(True)

        try:
            for piece, covered in text_pieces(self.tokenizer, tokens(), job.stop):
                choice.text, choice.tokens = choice.text + piece, covered
                yield piece
        finally:
            if not exhausted:  # a stop string ended the text, or the client went away: the engine frees the row
                request.cancelled.set()
                choice.stopped = True

    def response(self, job: Job) -> dict:
        """The whole answer of a job that is not streamed (its requests submitted)."""
        choices = []
        for i, r in enumerate(job.requests):
            choice = Choice()
            for _ in self.pieces(job, r, choice):
                pass
            if r.error:
                raise ApiError(500, r.error, kind="server_error")
            text = (self._prompt_text(r) if job.echo else "") + choice.text
            end = self._choice(job, r, i, text, range(choice.tokens), job.echo, delta=False)
            choices.append(end | {"finish_reason": "stop" if choice.stopped else r.finish_reason})
        kind = "chat.completion" if job.chat else "text_completion"
        return self._envelope(job, kind, choices) | {"usage": usage(job.requests)}

    def stream(self, job: Job) -> Iterator[dict]:
        """A streamed job's chunks, choice after choice (all choices decode together meanwhile)."""
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        for i, r in enumerate(job.requests):
            choice, sent = Choice(), 0
            if job.chat:
                yield self._envelope(job, kind, [{"index": i, "delta": {"role": "assistant", "content": ""}}])
            echoed, pending = not job.echo, ""
            for piece in self.pieces(job, r, choice):
                if not echoed:  # the prompt first, with its log-probs (scored before the first new token)
                    yield self._envelope(job, kind, [self._choice(job, r, i, self._prompt_text(r), range(0), True)])
                    echoed = True
                pending += piece
                if not r.out.empty():  # tokens decoded in the same dispatch go out in one event
                    continue
                yield self._envelope(job, kind, [self._choice(job, r, i, pending, range(sent, choice.tokens))])
                sent, pending = choice.tokens, ""
            if pending:
                yield self._envelope(job, kind, [self._choice(job, r, i, pending, range(sent, choice.tokens))])
                sent = choice.tokens
            if not echoed:
                yield self._envelope(job, kind, [self._choice(job, r, i, self._prompt_text(r), range(0), True)])
            if r.error:
                yield ApiError(500, r.error, kind="server_error").body
                return
            reason = "stop" if choice.stopped else r.finish_reason
            end = self._choice(job, r, i, "", range(0)) | {"logprobs": None, "finish_reason": reason}
            yield self._envelope(job, kind, [end])
        if job.stream_usage:
            yield self._envelope(job, kind, []) | {"usage": usage(job.requests)}

    def _prompt_text(self, r: Request) -> str:
        return self.tokenizer.decode(r.ids[1:])  # without the BOS before every prompt

    def _choice(self, job: Job, r: Request, index: int, text: str, new: range, prompt=False, delta=True):
        """Choice `index` with `text` and the log-probs of the prompt's tokens (`prompt`) and of new tokens `new`."""
        out = {"index": index, "finish_reason": None}
        logprobs = self._logprobs(job, r, new, prompt) if job.top is not None else None
        if not job.chat:
            return out | {"text": text, "logprobs": logprobs}
        content = (
            {"delta": {"content": text} if text else {}}
            if delta
            else {"message": {"role": "assistant", "content": text}}
        )
        return out | content | {"logprobs": logprobs}

    def _logprobs(self, job: Job, r: Request, new: range, prompt: bool) -> dict:
        """OpenAI's log-prob listing of the prompt's tokens (`prompt`, after the BOS) and new tokens `new`."""
        tok, top = self.tokenizer, job.top
        ids = list(r.ids[1:]) + r.new_ids  # the choice's tokens, as its text (echo) shows them
        entries = [(t, *s) for t, s in zip(r.ids[1:], r.prompt_scores)] if prompt else []
        entries += [(r.new_ids[k], *r.scores[k]) for k in new]
        if job.chat:
            return {"content": [_chat_logprob(tok, t, lp, alts[:top]) for t, lp, alts in entries]}
        first = 0 if prompt else len(r.ids) - 1 + new.start
        skip = 0 if job.echo else len(tok.decode(r.ids[1:]))  # offsets count from the returned text's start
        return {
            "tokens": [tok.token_text(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tok.token_text(a): v for a, v in alts[:top]} for _, _, alts in entries],
            "text_offset": [len(tok.decode(ids[:k])) - skip for k in range(first, first + len(entries))],
        }

    def _envelope(self, job: Job, kind: str, choices: list) -> dict:
        """What every completion object and stream chunk carries around its choices."""
        return {
            "id": job.rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }


def usage(requests: list[Request]) -> dict:
    prompts = {id(r.ids): len(r.ids) for r in requests}  # a prompt's n choices count it once
    completion = sum(r.generated for r in requests)
    return {
        "prompt_tokens": sum(prompts.values()),
        "completion_tokens": completion,
        "total_tokens": sum(prompts.values()) + completion,
    }


def _chat_logprob(tokenizer, token: int, logprob: float, alternatives: list) -> dict:
    def entry(t, lp):
        return {"token": tokenizer.token_text(t), "logprob": lp, "bytes": tokenizer.token_utf8(t)}

    return entry(token, logprob) | {"top_logprobs": [entry(a, v) for a, v in alternatives]}
