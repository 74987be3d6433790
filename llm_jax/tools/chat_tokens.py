"""`llm-jax import-hf --chat-tokens`: our chat format on a base model that has no chat template.

The four control tokens of llm_jax's format (<|system|>, <|user|>, <|assistant|>, <|end_of_turn|>)
are added to the model's tokenizer as special tokens (appended to a tokenizer.json's added tokens,
or as control pieces of a sentencepiece model), the format is written beside them as the model's
chat_template.jinja (so the run and transformers, after export-hf, render conversations alike), and
<|end_of_turn|> joins generation_config.json's eos_token_id (it ends a reply). The embedding (and
an untied lm_head) gets rows for the new ids: the mean of the trained rows, as transformers'
resize_token_embeddings does by default, so the new tokens start where the model's average token
is instead of at noise that could dominate the softmax. Where the checkpoint's vocabulary already
has unused padded rows past the tokenizer (Qwen2's), the new ids take those; otherwise the
vocabulary grows to the next multiple of 128, which keeps it divisible by any tensor or fsdp split
up to 128. Until SFT trains them the new tokens mean nothing to the model; the logits of the old
tokens are unchanged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import tokenizers

from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.data.tokenizer import CHAT_TOKENS, copy_tokenizer, load_tokenizer
from llm_jax.data.tokenizer_base import BaseTokenizer, read_json
from llm_jax.errors import UserError

VOCAB_MULTIPLE = 128


def add_chat_tokens(tokenizer: BaseTokenizer, out: Path) -> BaseTokenizer:
    """`tokenizer` and its model files copied into `out`, with the chat tokens and template added."""
    if tokenizer.chat_template:
        raise UserError(
            f"{tokenizer.path.parent} has its own chat template; import it without --chat-tokens to chat in its format"
        )
    present = [t for t in CHAT_TOKENS if tokenizer.piece_id(t) is not None]
    if present:
        raise UserError(
            f"{tokenizer.path}: {', '.join(present)} already in the vocabulary; import without --chat-tokens"
        )
    copy_tokenizer(tokenizer.path, out)
    path = out / tokenizer.path.name
    if path.suffix == ".json":
        tok = tokenizers.Tokenizer.from_file(str(path))
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
        tok.save(str(path))
    else:
        path.write_bytes(with_control_pieces(path.read_bytes(), CHAT_TOKENS))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    generation = read_json(out / "generation_config.json")
    ends = generation.get("eos_token_id")
    ends = ends if isinstance(ends, list) else [tokenizer.eos_id] if ends is None else [ends]
    end_of_turn = load_tokenizer(path).piece_id(CHAT_TOKENS[-1])
    (out / "generation_config.json").write_text(
        json.dumps(generation | {"eos_token_id": [*ends, end_of_turn]}, indent=2)
    )
    return load_tokenizer(path)


def with_control_pieces(model: bytes, pieces: list[str]) -> bytes:
    """A serialized sentencepiece ModelProto with control pieces appended to its vocabulary, written in
    protobuf's wire format: `pieces` is field 1, a repeated SentencePiece {1: piece, 2: score (float),
    3: type (CONTROL = 3)}, serialized first, so the new entries go after the last of them, where
    ModelProto.SerializeToString would put them. (Not sentencepiece_model_pb2: the wheel's module is
    generated for protobuf 7 and refuses older runtimes, such as the protobuf 6 that apache-beam requires.)"""
    at = 0
    while at < len(model):  # top-level fields: past the pieces (field 1, length-delimited)
        key, after = _varint(model, at)
        if key != (1 << 3) | 2:
            break
        length, after = _varint(model, after)
        at = after + length
    new = b""
    for piece in pieces:
        text = piece.encode()
        body = b"\x0a" + _encode_varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x03"
        new += b"\x0a" + _encode_varint(len(body)) + body
    return model[:at] + new + model[at:]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def grown_vocab(model_vocab: int, tokenizer_vocab: int) -> int:
    """The model's vocabulary size once the tokenizer has `tokenizer_vocab` tokens."""
    if tokenizer_vocab <= model_vocab:
        return model_vocab
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def grow_embeddings(params: dict, new_ids: list[int], vocab: int) -> dict:
    """Embedding (and lm_head) rows for `new_ids` and any rows past the old vocabulary: the mean of
    the old rows that are not new."""
    grown = dict(params)
    for name in ("embedding", "lm_head"):
        if name not in params:
            continue
        old = np.asarray(params[name], np.float32)
        trained = np.ones(len(old), bool)
        trained[[i for i in new_ids if i < len(old)]] = False
        mean = old[trained].mean(0)
        rows = np.concatenate([old, np.broadcast_to(mean, (vocab - len(old), old.shape[1]))])
        rows[new_ids] = mean
        grown[name] = rows
    return grown
