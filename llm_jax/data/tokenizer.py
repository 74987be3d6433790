"""Tokenizers: one interface over a SentencePiece model (ours, trained here, or a Llama-2-style
import) and a Hugging Face `tokenizer.json` (byte-level BPE: Llama 3, Qwen2, ...; hf_tokenizer.py).

Ours is SentencePiece BPE trained on the corpus (byte fallback, so any text round-trips).
Normalisation is off and whitespace is kept as is, so newlines and indentation survive (a play's
layout is its speaker lines); a newline is the byte piece <0x0A>. Special tokens are control
symbols: `encode` never produces them from text, so user text cannot forge a chat turn.

An imported tokenizer keeps the model's own files beside it: tokenizer_config.json (BOS, EOS, the
Jinja chat template, or chat_template.jinja) and generation_config.json (the ids that end a reply).
Every prompt and document starts with `bos_id`: the model's BOS or, where it has none (ours,
Qwen2), <|endoftext|> (the document separator both pretrain with), else its EOS.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.tokenizer_base import EOS, BaseTokenizer, read_json
from llm_jax.errors import UserError

PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")
_N_RESERVED = 3 + len(CHAT_TOKENS) + 256  # unk, eos, pad, chat tokens, byte pieces
# The files a run's tokenizer is: the model (one of the first two) and an imported model's own settings.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_FILES += ("generation_config.json", "tokenizer.vocab", "special_tokens_map.json")


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """A sentencepiece .model, a tokenizer.json, or a directory holding one (tokenizer.json first)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise UserError(f"{path} holds no tokenizer (tokenizer.json or a sentencepiece tokenizer.model)")
        path = found[0]
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Tokenizer(path)


def copy_tokenizer(source: str | Path, directory: Path) -> None:
    """The tokenizer `source` (a file, or a directory holding one) and the model files beside it,
    copied into `directory` (a run directory is self-contained)."""
    source = load_tokenizer(source).path
    other = "tokenizer.model" if source.suffix == ".json" else "tokenizer.json"  # the kind not in use
    for name in TOKENIZER_FILES:
        if (source.parent / name).is_file() and name not in (other, source.name):
            shutil.copyfile(source.parent / name, directory / name)
    shutil.copyfile(source, directory / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))


class Tokenizer(BaseTokenizer):
    """A loaded sentencepiece model."""

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
        self._specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.is_special(i)}
        self._read_model_files(self.sp.bos_id() if self.sp.bos_id() >= 0 else None)
        # A model with sentencepiece's dummy prefix (Llama 2's; not ours) read as transformers reads it
        # unless its tokenizer_config.json says legacy: the text after a special token gets no "▁".
        legacy = read_json(path.parent / "tokenizer_config.json").get("legacy", False)
        self._prefix_after_specials = legacy or not self.sp.encode_as_pieces("a")[0].startswith("\u2581")

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(int(token))

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_specials(self, text: str) -> list[int]:
        ids, rest = [], text
        while rest:
            at = [(rest.find(p), p) for p in self._specials if p in rest]
            if not at:
                break
            i, p = min(at, key=lambda a: (a[0], -len(a[1])))
            ids += (self._encode_part(rest[:i], not ids) if i else []) + [self._specials[p]]
            rest = rest[i + len(p) :]
        return ids + (self._encode_part(rest, not ids) if rest else [])

    def _encode_part(self, text: str, first: bool) -> list[int]:
        if first or self._prefix_after_specials:
            return self.encode(text)
        unk = self.sp.id_to_piece(self.sp.unk_id())  # encoded after "<unk>" as text: no dummy prefix
        return self.encode(unk + text)[len(self.encode(unk)) :]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=0)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def is_special(self, token: int) -> bool:
        return self.sp.is_control(int(token)) or self.sp.is_unknown(int(token))

    def token_utf8(self, token: int) -> list[int]:
        if self.sp.is_byte(int(token)):
            return [int(self.piece(token)[3:5], 16)]
        return list(self.piece(token).replace("\u2581", " ").encode())


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
