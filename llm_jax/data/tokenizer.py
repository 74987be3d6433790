"""SentencePiece BPE: trained on the corpus (byte fallback, so any text round-trips) or loaded.

Normalisation is off and whitespace is kept as is, so newlines and indentation survive (a play's
layout is its speaker lines); a newline is the byte piece <0x0A>. Special tokens are control
symbols: `encode` never produces them from text, so user text cannot forge a chat turn.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llm_jax.errors import UserError

EOS = "<|endoftext|>"  # separates documents; also ends a generation
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")
_N_RESERVED = 3 + len(CHAT_TOKENS) + 256  # unk, eos, pad, chat tokens, byte pieces


class Tokenizer:
    """A loaded sentencepiece model with the ids the rest of llm_jax needs."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"tokenizer {path} does not exist; set data.tokenizer to a sentencepiece .model or to null to train one"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is not a sentencepiece model: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.piece_to_id(EOS)
        if self.sp.id_to_piece(self.eos_id) != EOS:
            self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise UserError(f"tokenizer {path} has neither {EOS} nor an eos piece to separate documents")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=0)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, token: int) -> str:
        """One token as text, for log-prob listings: its piece with the word marker as a space; a byte
        token as its character when ASCII, else as OpenAI writes lone bytes ("bytes:\\xe2")."""
        piece = self.sp.id_to_piece(int(token))
        if not self.sp.is_byte(int(token)):
            return piece.replace("\u2581", " ")
        byte = int(piece[3:5], 16)
        return chr(byte) if byte < 128 else f"bytes:\\x{byte:02x}"

    def token_utf8(self, token: int) -> list[int]:
        """The bytes one token stands for (a byte token: its byte)."""
        if self.sp.is_byte(int(token)):
            return [int(self.sp.id_to_piece(int(token))[3:5], 16)]
        return list(self.token_text(token).encode())

    def token_bytes(self, size: int | None = None) -> np.ndarray:
        """[size] int32 (default: the vocabulary): UTF-8 bytes each token stands for, for bits per byte;
        0 for control tokens and for ids past the vocabulary (a model's vocab_size may be larger)."""
        out = np.zeros(size or self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            piece = self.sp.id_to_piece(i)
            out[i] = 1 if self.sp.is_byte(i) else len(piece.replace("\u2581", " ").encode())
        return out


def sample_lines(texts: Iterable[str], sample_bytes: int, seed: int, total_bytes: int | None = None) -> list[str]:
    """A seeded sample of whole non-empty lines, at most `sample_bytes`, from a stream of about
    `total_bytes` that is never held whole: each line is kept with probability 2 * sample / total,
    then the kept lines are shuffled and cut to the budget."""
    rng = random.Random(seed)
    keep = 1.0 if not total_bytes else min(1.0, 2 * sample_bytes / total_bytes)
    lines = [line for text in texts for line in text.split("\n") if line.strip() and (keep >= 1 or rng.random() < keep)]
    rng.shuffle(lines)
    sample, total = [], 0
    for line in lines:
        if total >= sample_bytes:
            break
        sample.append(line)
        total += len(line.encode())
    return sample


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_prefix: Path,
    sample_bytes: int,
    seed: int,
    total_bytes: int | None = None,
) -> Tokenizer:
    """Trains a BPE model on a seeded sample of whole lines (at most `sample_bytes`) of `texts`."""
    if vocab_size < _N_RESERVED + 64:
        raise UserError(
            f"model.vocab_size={vocab_size} is too small for a byte-fallback tokenizer: "
            f"{_N_RESERVED} ids are reserved; use at least {_N_RESERVED + 64}"
        )
    sample = sample_lines(texts, sample_bytes, seed, total_bytes)
    model = io.BytesIO()  # trained in memory: a model_prefix would embed the run's path in the .model file
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            max_sentence_length=1 << 16,
            seed_sentencepiece_size=1_000_000,
            unk_id=0,
            bos_id=-1,
            eos_id=1,
            pad_id=2,
            eos_piece=EOS,
            pad_piece=PAD,
            control_symbols=list(CHAT_TOKENS),
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "Vocabulary size is too high" in str(e) or "vocab_size" in str(e):
            raise UserError(
                f"the corpus is too small for model.vocab_size={vocab_size} ({e}); lower model.vocab_size or add text"
            ) from None
        raise
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    for ext, data in ((".vocab", vocab.encode()), (".model", model.getvalue())):  # .model last: it marks completion
        tmp = Path(f"{out_prefix}{ext}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, f"{out_prefix}{ext}")
    return Tokenizer(f"{out_prefix}.model")
