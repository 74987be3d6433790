"""The tokenizer interface the rest of llm_jax uses, and what every kind reads from the files of the
model it came with (tokenizer.py: sentencepiece; hf_tokenizer.py: tokenizer.json)."""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llm_jax.errors import UserError

EOS = "<|endoftext|>"  # separates documents; also ends a generation


def token_content(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class BaseTokenizer(abc.ABC):
    """What the rest of llm_jax uses; subclasses set `vocab_size`, `eos_id` and the piece methods."""

    path: Path
    vocab_size: int
    eos_id: int

    def _read_model_files(self, default_bos: int | None) -> None:
        """BOS, the chat template and the reply-ending ids from the files beside the tokenizer."""
        config = read_json(self.path.parent / "tokenizer_config.json")
        bos = token_content(config.get("bos_token"))
        self.bos_id = self.piece_id(bos) if bos and self.piece_id(bos) is not None else default_bos
        if self.bos_id is None:  # no BOS (ours, Qwen2): the document separator, as in pretraining
            self.bos_id = self.piece_id(EOS) if self.piece_id(EOS) is not None else self.eos_id
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = self.path.parent / "chat_template.jinja"
        self.chat_template: str | None = jinja.read_text() if jinja.is_file() else template
        self.bos_token, self.eos_token = self.piece(self.bos_id), self.piece(self.eos_id)
        ends = read_json(self.path.parent / "generation_config.json").get("eos_token_id")
        ends = ends if isinstance(ends, list) else [ends] if isinstance(ends, int) else []
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *ends]))

    @abc.abstractmethod
    def piece(self, token: int) -> str: ...

    @abc.abstractmethod
    def piece_id(self, piece: str) -> int | None:
        """The id of a whole piece (a special token's text), None if the vocabulary lacks it."""
        ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_with_specials(self, text: str) -> list[int]:
        """Text in which special tokens' texts (a rendered chat template's) stand for those tokens."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def is_special(self, token: int) -> bool: ...

    @abc.abstractmethod
    def token_utf8(self, token: int) -> list[int]:
        """The bytes one token stands for (a byte token: its byte; a special token: its text's)."""
        ...

    def token_text(self, token: int) -> str:
        """One token as text, for log-prob listings: its text when whole UTF-8, a lone byte as OpenAI
        writes it ("bytes:\\xe2")."""
        raw = bytes(self.token_utf8(token))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "".join(f"bytes:\\x{b:02x}" for b in raw)

    def token_bytes(self, size: int | None = None) -> np.ndarray:
        """[size] int32 (default: the vocabulary): UTF-8 bytes each token stands for, for bits per byte;
        0 for special tokens and for ids past the vocabulary (a model's vocab_size may be larger)."""
        out = np.zeros(size or self.vocab_size, np.int32)
        for i in range(min(self.vocab_size, len(out))):
            out[i] = 0 if self.is_special(i) else len(self.token_utf8(i))
        return out


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None
