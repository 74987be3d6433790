"""The files of a Hugging Face model directory: safetensors weights (one file, or shards and their index)
and, for a run trained here, the tokenizer files transformers reads (tools/hf.py converts the tensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llm_jax.data.chat_template import CHAT_TEMPLATE, special_ids
from llm_jax.data.tokenizer import EOS, PAD
from llm_jax.errors import UserError


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards its index lists -> float32 numpy arrays (bf16/f16 upcast)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(
            f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
            "(PyTorch .bin checkpoints: re-save with save_pretrained(safe_serialization=True))"
        )
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir}: shard {name} listed in model.safetensors.index.json is missing")
        with safe_open(hf_dir / name, framework="flax") as f:  # flax: bf16 arrives as jax bfloat16, not an error
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], out: Path, shard_bytes: int) -> None:
    """One model.safetensors, or model-0000i-of-0000n.safetensors + an index above shard_bytes."""
    shards, size = [{}], 0
    for name, w in tensors.items():
        if size and size + w.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_our_tokenizer(tokenizer, seq_len: int, out: Path) -> tuple[list[int], int | None]:
    """A run trained here: its sentencepiece model with a LlamaTokenizer config that puts <|endoftext|>
    before the text as BOS (as llm_jax does), and our chat template -> (the end ids, the pad id)."""
    try:
        chat_ids = special_ids(tokenizer)
    except UserError:
        chat_ids = None
    pad_id = tokenizer.piece_id(PAD)
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")  # Hugging Face's name for it
    specials = {i: tokenizer.piece(i) for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)}
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": tokenizer.piece(tokenizer.bos_id),
        "eos_token": EOS,
        "unk_token": tokenizer.sp.id_to_piece(tokenizer.sp.unk_id()),
        "pad_token": PAD if pad_id is not None else None,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "added_tokens_decoder": {
            str(i): {
                "content": p,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, p in specials.items()
        },
        "additional_special_tokens": [p for p in specials.values() if p.startswith("<|") and p not in (EOS, PAD)],
    }
    if chat_ids:
        tok_config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return [tokenizer.eos_id] + ([chat_ids["end_of_turn"]] if chat_ids else []), pad_id
