"""A Hugging Face `tokenizer.json` (the `tokenizers` library): the byte-level BPE of Llama 3, Qwen2,
GPT-2-style models, or any other model that file describes, behind llm_jax's tokenizer interface.

`encode` reads special tokens' texts as plain text (user text cannot forge a chat turn, as with our
sentencepiece control symbols); `encode_with_specials` (a rendered chat template) reads them as the
tokens, as transformers' apply_chat_template does. `decode` drops special tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from llm_jax.data.tokenizer_base import EOS, BaseTokenizer, read_json, token_content
from llm_jax.errors import UserError


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is written as one printable character in a token's
    text (printable ASCII and Latin-1 as themselves, the rest shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


class HFTokenizer(BaseTokenizer):
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UserError(f"tokenizer {self.path} does not exist")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises plain Exceptions for a malformed file
            raise UserError(f"{self.path} is not a Hugging Face tokenizer.json: {str(e).splitlines()[0]}") from None
        self._plain = tokenizers.Tokenizer.from_file(str(self.path))
        self._plain.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        config = read_json(self.path.parent / "tokenizer_config.json")
        eos = token_content(config.get("eos_token")) or EOS
        self.eos_id = self.piece_id(eos)
        if self.eos_id is None:
            raise UserError(f"{self.path}: its eos_token {eos!r} is not in the vocabulary")
        decoder = read_json(self.path).get("decoder") or {}
        self._byte_level = "ByteLevel" in [decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []))]
        self._read_model_files(None)

    def piece(self, token: int) -> str:
        return self.tok.id_to_token(int(token)) or ""

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def is_special(self, token: int) -> bool:
        return self.piece(token) in self._special

    def token_utf8(self, token: int) -> list[int]:
        piece = self.piece(token)
        if self.is_special(token):
            return list(piece.encode())
        if self._byte_level:
            chars = _byte_of_char()
            if all(c in chars for c in piece):
                return [chars[c] for c in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return [int(piece[3:5], 16)]
        return list(piece.replace("\u2581", " ").encode())
