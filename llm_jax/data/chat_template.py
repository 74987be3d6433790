"""The chat template: one definition for SFT and DPO data, generation, `llm-jax chat` and the server.

A run whose tokenizer came with a model's own Jinja chat template (an import: tokenizer_config.json)
renders conversations with it, as transformers' apply_chat_template does (a sandboxed Jinja
environment, trim_blocks and lstrip_blocks); the trained tokens of a conversation are those each
assistant turn adds to the rendering of the turns before it with a generation prompt. Otherwise
(runs trained here) a conversation is rendered as

    <|endoftext|> [<|system|> text <|end_of_turn|>] <|user|> text <|end_of_turn|> <|assistant|> text <|end_of_turn|> ...

with the role and end-of-turn markers as control tokens (user text can never produce them). The
training weight is 1 on each assistant turn's text and its <|end_of_turn|> (so the model learns to
stop) and 0 elsewhere. A generation prompt ends with <|assistant|>; decoding stops at <|end_of_turn|>.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm_jax.data.tokenizer import CHAT_TOKENS
from llm_jax.data.tokenizer import BaseTokenizer as Tokenizer
from llm_jax.errors import UserError

ROLES = ("system", "user", "assistant")
# Our format as a Jinja chat template (export-hf writes it for transformers; it renders the same ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end_of_turn|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
Message = dict  # {"role": one of ROLES, "content": str}


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"system", "user", "assistant", "end_of_turn"} -> token id (our template's tokens)."""
    ids = {tok.strip("<|>"): tokenizer.piece_id(tok) for tok in CHAT_TOKENS}
    missing = [tok for tok in CHAT_TOKENS if ids[tok.strip("<|>")] is None]
    if missing:
        raise UserError(
            f"tokenizer {tokenizer.path} lacks the chat tokens {', '.join(missing)} and has no chat template "
            "of its own: chat needs a run trained here, a model with a chat_template, or a base model "
            "imported with `llm-jax import-hf --chat-tokens` and fine-tuned (train.objective=sft)"
        )
    return ids


def check_chat(tokenizer: Tokenizer) -> None:
    """One clear line where a tokenizer can render no conversation."""
    if not tokenizer.chat_template:
        special_ids(tokenizer)


@functools.cache
def _compiled(template: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template does not compile: {e}") from None


def _template_ids(tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool) -> list[int]:
    try:
        text = _compiled(tokenizer.chat_template).render(
            messages=list(messages),
            add_generation_prompt=generation_prompt,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
        )
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template of {tokenizer.path.parent} refuses these messages: {e}") from None
    return tokenizer.encode_with_specials(text)


def _render_template(
    tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool
) -> tuple[list[int], list[float]]:
    ids = _template_ids(tokenizer, messages, generation_prompt)
    weights = [0.0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template_ids(tokenizer, messages[:i], True)
        through = _template_ids(tokenizer, messages[: i + 1], False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise UserError(
                f"the chat template of {tokenizer.path.parent} does not render a conversation as the "
                "rendering of its first turns followed by more, so the assistant's tokens cannot be told apart"
            )
        weights[len(before) : len(through)] = [1.0] * (len(through) - len(before))
    return ids, weights


def check_messages(messages: Sequence[Message], where: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(
                f'{where}: message {i} must be {{"role": {" | ".join(ROLES)}, "content": text}}, got {m!r:.80}'
            )


def render(
    tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool = False
) -> tuple[list[int], list[float]]:
    """Messages -> (token ids, per-token training weight). With generation_prompt the ids end with
    <|assistant|>, ready for the model to write the next turn."""
    if tokenizer.chat_template:
        return _render_template(tokenizer, messages, generation_prompt)
    sp = special_ids(tokenizer)
    ids, weights = [tokenizer.bos_id], [0.0]
    for m in messages:
        body = tokenizer.encode(m["content"]) + [sp["end_of_turn"]]
        w = 1.0 if m["role"] == "assistant" else 0.0
        ids += [sp[m["role"]]] + body
        weights += [0.0] + [w] * len(body)
    if generation_prompt:
        ids.append(sp["assistant"])
        weights.append(0.0)
    return ids, weights


def fit_example(ids: list[int], weights: list[float], length: int) -> tuple[list[int], list[float]] | None:
    """The truncation rule for training examples of at most `length` tokens: keep the first
    `length` tokens (the system prompt and the question come first); None if that cuts away every
    trained token, since such an example teaches nothing."""
    ids, weights = ids[:length], weights[:length]
    return (ids, weights) if any(weights) else None


def prompt_ids(
    tokenizer: Tokenizer, messages: Sequence[Message], system: str | None = None
) -> tuple[list[int], tuple[int, ...]]:
    """A generation prompt (with `system` first if given and the messages have none) and the ids
    that end the reply: <|end_of_turn|> (ours) or the model's own end ids, and EOS."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    ids, _ = render(tokenizer, messages, generation_prompt=True)
    if tokenizer.chat_template:
        return ids, tokenizer.stop_ids
    return ids, (special_ids(tokenizer)["end_of_turn"], tokenizer.eos_id)


def reply_example(tokenizer: Tokenizer, messages: Sequence[Message], reply: str) -> tuple[list[int], list[float]]:
    """A conversation and one assistant reply: its tokens weighted 1 (with the end of turn), the
    conversation's 0 (DPO)."""
    ids, weights = render(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    prefix, _ = render(tokenizer, messages, generation_prompt=True)
    if ids[: len(prefix)] != prefix:
        raise UserError(f"the chat template of {tokenizer.path.parent} does not end a prompt where the reply starts")
    return ids, [0.0] * len(prefix) + weights[len(prefix) :]
