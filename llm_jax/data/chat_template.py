"""The chat template: one definition for SFT and DPO data, generation, `llm-jax chat` and the server.

A conversation is rendered as

    <|endoftext|> [<|system|> text <|end_of_turn|>] <|user|> text <|end_of_turn|> <|assistant|> text <|end_of_turn|> ...

with the role and end-of-turn markers as control tokens (user text can never produce them). The
training weight is 1 on each assistant turn's text and its <|end_of_turn|> (so the model learns to
stop) and 0 elsewhere. A generation prompt ends with <|assistant|>; decoding stops at <|end_of_turn|>.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_jax.data.tokenizer import CHAT_TOKENS, Tokenizer
from llm_jax.errors import UserError

ROLES = ("system", "user", "assistant")
Message = dict  # {"role": one of ROLES, "content": str}


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"system", "user", "assistant", "end_of_turn"} -> token id."""
    ids = {tok.strip("<|>"): tokenizer.sp.piece_to_id(tok) for tok in CHAT_TOKENS}
    missing = [tok for tok in CHAT_TOKENS if tokenizer.sp.id_to_piece(ids[tok.strip("<|>")]) != tok]
    if missing:
        raise UserError(
            f"tokenizer {tokenizer.path} lacks the chat tokens {', '.join(missing)}; chat models need a "
            "tokenizer trained by llm_jax (or one with these control symbols)"
        )
    return ids


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
    sp = special_ids(tokenizer)
    ids, weights = [tokenizer.eos_id], [0.0]
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
    that end the reply: <|end_of_turn|>, and EOS should a model produce it."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    ids, _ = render(tokenizer, messages, generation_prompt=True)
    return ids, (special_ids(tokenizer)["end_of_turn"], tokenizer.eos_id)
