"""The fields of an OpenAI request body, checked one at a time: each bad one an ApiError, the OpenAI error
body a client gets with its HTTP status (llm_jax/inference/openai_api.py reads bodies through these)."""

from __future__ import annotations

from llm_jax.data.chat_template import ROLES


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


def is_ids(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {value!r}", key)
    return bool(value)


def plain_message(m):
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


def number(body: dict, key: str, default, lo: float, hi: float | None, integer: bool = False, hint: str = ""):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < lo or (hi is not None and value > hi):
        want = "an integer" if integer else "a number"
        bounds = f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
        raise ApiError(400, f"'{key}' must be {want}{bounds}, got {value!r}" + (f" ({hint})" if hint else ""), key)
    return value


def integer(body: dict, key: str, default, lo: int, hi: int | None, hint: str = ""):
    return number(body, key, default, lo, hi, integer=True, hint=hint)
