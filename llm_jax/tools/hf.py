"""Hugging Face Llama checkpoints: `llm-jax export-hf` and `llm-jax import-hf`.

Our model is the Llama architecture, so the conversion is a renaming and a transpose. Our weights
are [*in, *out] (stacked over layers); Hugging Face's linear weights are [out, in] per layer:

    wq [L, D, N, H] <-> model.layers.{i}.self_attn.q_proj.weight [N*H, D]   (k_proj, v_proj: K heads)
    wo [L, N, H, D] <-> model.layers.{i}.self_attn.o_proj.weight [D, N*H]
    w_gate, w_up [L, D, F] <-> mlp.gate_proj / mlp.up_proj.weight [F, D];  w_down [L, F, D] <-> [D, F]
    attn_norm, mlp_norm [L, D] <-> input_layernorm, post_attention_layernorm.weight [D]
    embedding [V, D] <-> model.embed_tokens.weight;  final_norm <-> model.norm.weight;
    lm_head [V, D] <-> lm_head.weight (absent when tied)

RoPE needs no permutation: apply_rope pairs the two halves of each head, as HF's rotate_half does.
An imported run computes in float32 when the checkpoint's torch_dtype is float32 (exact parity),
otherwise in bfloat16 (model.dtype; parameters are float32 either way). The tokenizer travels as
the sentencepiece model with a LlamaTokenizer config (ids encode as ours: no BOS/EOS added, no extra
prefix space) and the chat template as a Jinja string.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llm_jax.config import load_config
from llm_jax.data.chat_template import special_ids
from llm_jax.data.tokenizer import EOS, PAD, Tokenizer
from llm_jax.errors import UserError
from llm_jax.model.dense import IN_DIMS
from llm_jax.parallel.sharding import abstract_params, inference_layout, single_device_layout
from llm_jax.run import load_config_of, load_run, write_params_run

LAYER_NAMES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
TOP_NAMES = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end_of_turn|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def to_hf_tensors(params: dict, n_layers: int) -> dict[str, np.ndarray]:
    """Our float params -> {HF tensor name: float32 array}."""
    out = {hf: np.asarray(params[ours], np.float32) for ours, hf in TOP_NAMES.items() if ours in params}
    for ours, hf in LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][ours], np.float32)
        for i in range(n_layers):
            w = stacked[i]
            if ours in IN_DIMS:  # [*in, *out] -> [out, in]
                w = w.reshape(math.prod(w.shape[: IN_DIMS[ours]]), -1).T
            out[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(w)
    return out


def from_hf_tensors(tensors: dict[str, np.ndarray], shapes: dict, n_layers: int) -> dict:
    """{HF name: array} -> our params, given our shapes (a tree like the params); each missing or
    misshapen tensor is named, all at once."""
    problems, params, layers = [], {}, {}

    def take(name: str, shape: tuple[int, ...], in_dims: int):
        if name not in tensors:
            problems.append(f"missing tensor {name}")
            return None
        w = tensors[name]
        want = shape if not in_dims else (math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))
        if tuple(w.shape) != want:
            problems.append(f"tensor {name} has shape {tuple(w.shape)}, expected {want}")
            return None
        return (w.T if in_dims else w).reshape(shape).astype(np.float32)

    for ours, hf in TOP_NAMES.items():
        if ours in shapes:
            params[ours] = take(hf, shapes[ours], 0)
    for ours, hf in LAYER_NAMES.items():
        shape = shapes["layers"][ours][1:]
        rows = [take(f"model.layers.{i}.{hf}.weight", shape, IN_DIMS.get(ours, 0)) for i in range(n_layers)]
        layers[ours] = None if any(r is None for r in rows) else np.stack(rows)
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise UserError("the checkpoint does not match its config.json:\n  - " + "\n  - ".join(shown))
    return {**params, "layers": layers}


def hf_config(model, tokenizer, pad_id: int, chat_ids: dict | None) -> dict:
    """Our ModelConfig -> a LlamaForCausalLM config.json."""
    eos = [tokenizer.eos_id] + ([chat_ids["end_of_turn"]] if chat_ids else [])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.mlp_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": eos,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def model_overrides(config: dict, path: Path, seq_len: int | None) -> list[str]:
    """An HF config.json -> our model.* overrides; an unsupported feature names its field."""

    def need(field, ok, why):
        if not ok:
            raise UserError(f"{path}: {field}={config.get(field)!r} is not supported ({why})")

    need("model_type", config.get("model_type") in ARCHITECTURES, f"llm_jax imports {', '.join(ARCHITECTURES)}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        need(field, isinstance(config.get(field), int) and config[field] > 0, "a positive integer is required")
    d, n = config["hidden_size"], config["num_attention_heads"]
    k = config.get("num_key_value_heads") or n
    need("num_key_value_heads", isinstance(k, int) and n % k == 0, "it must divide num_attention_heads")
    need("head_dim", config.get("head_dim") in (None, d // n) and d % n == 0, "llm_jax uses hidden_size / heads")
    need("hidden_act", config.get("hidden_act", "silu") == "silu", "the MLP is SwiGLU")
    need("attention_bias", not config.get("attention_bias"), "projections have no bias")
    need("mlp_bias", not config.get("mlp_bias"), "projections have no bias")
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    need(
        "rope_scaling",
        scaling.get("rope_type", scaling.get("type", "default")) == "default",
        "only plain RoPE (no scaling) is implemented",
    )
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    context = seq_len or min(config.get("max_position_embeddings", 2048), 4096)
    dtype = config.get("torch_dtype", config.get("dtype", "bfloat16"))  # compute as stored: float32 stays exact
    window = config.get("sliding_window")
    need(
        "sliding_window",
        window is None or window >= context,
        f"attention is full; pass --seq-len {window} or less to import it",
    )
    return [
        f"model.vocab_size={config['vocab_size']}",
        f"model.d_model={d}",
        f"model.n_layers={config['num_hidden_layers']}",
        f"model.n_heads={n}",
        f"model.n_kv_heads={k}",
        f"model.mlp_dim={config['intermediate_size']}",
        f"model.seq_len={context}",
        f"model.rope_theta={float(theta)}",
        f"model.norm_eps={float(config.get('rms_norm_eps', 1e-6))}",
        f"model.tie_embeddings={str(bool(config.get('tie_word_embeddings', False))).lower()}",
        f"model.init_std={float(config.get('initializer_range', 0.02))}",
        "model.dropout=0.0",
        f"model.dtype={'float32' if dtype == 'float32' else 'bfloat16'}",
    ]


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


def export_hf(run_dir: str, out_dir: str, shard_bytes: int = 2000 << 20, mesh: str = "1,1,1", log=print) -> Path:
    """The float32 parameters are read split over --mesh and gathered to the host one tensor at a time."""
    run = load_run(run_dir, inference_layout(load_config_of(run_dir), mesh))
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    if cfg.model.quant != "none":
        raise UserError(f"{run_dir} holds {cfg.model.quant} weights; export the float run it was quantized from")
    out = Path(out_dir).expanduser()
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --out")
    try:
        chat_ids = special_ids(tokenizer)
    except UserError:
        chat_ids = None
    pad_id = tokenizer.sp.piece_to_id(PAD) if tokenizer.sp.id_to_piece(tokenizer.sp.piece_to_id(PAD)) == PAD else None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(to_hf_tensors(params, cfg.model.n_layers), tmp, shard_bytes)
    config = hf_config(cfg.model, tokenizer, pad_id, chat_ids)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    s = cfg.sample
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": pad_id,
        "do_sample": s.temperature > 0,
        "temperature": s.temperature or None,
        "top_k": s.top_k or None,
        "top_p": s.top_p,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")  # Hugging Face's name for it
    specials = {
        i: tokenizer.sp.id_to_piece(i)
        for i in range(tokenizer.vocab_size)
        if tokenizer.sp.is_control(i) or tokenizer.sp.is_unknown(i)
    }
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": tokenizer.sp.id_to_piece(tokenizer.sp.unk_id()),
        "pad_token": PAD if pad_id is not None else None,
        "model_max_length": cfg.model.seq_len,
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
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    tmp.rename(out)
    log(
        f"exported {run_dir} ({run.step} steps) -> {out} (LlamaForCausalLM, "
        f"{sum(w.size for w in to_hf_tensors(params, cfg.model.n_layers).values()):,} parameters)"
    )
    return out


def import_hf(hf_dir: str, out_dir: str, seq_len: int | None = None, log=print) -> Path:
    src, out = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a Hugging Face model directory (no config.json)")
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --out")
    try:
        config = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{src / 'config.json'}: malformed JSON ({e})") from None
    if not (src / "tokenizer.model").is_file():
        raise UserError(
            f"{src} has no sentencepiece tokenizer.model (tokenizer.json-only models such as "
            "Llama 3 are not supported yet)"
        )
    Tokenizer(src / "tokenizer.model")  # a clear error now if it is not a usable sentencepiece model
    cfg = load_config(None, [f"run_dir={out}", *model_overrides(config, src / "config.json", seq_len)])
    shapes = jax.tree_util.tree_map(lambda a: a.shape, abstract_params(cfg.model, single_device_layout()))
    tensors = read_safetensors(src)
    if cfg.model.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    params = from_hf_tensors(tensors, shapes, cfg.model.n_layers)
    expected = set(to_hf_tensors(params, cfg.model.n_layers))
    unexpected = sorted(k for k in tensors if k not in expected and "rotary_emb" not in k)
    if unexpected:
        raise UserError(
            f"{src}: tensors llm_jax's Llama has no place for: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    write_params_run(out, cfg, params, "0", src)  # takes the tokenizer.model along
    log(
        f"imported {src} -> {out} ({cfg.model.n_layers} layers, d_model {cfg.model.d_model}, context "
        f"{cfg.model.seq_len}); use it with generate, chat, serve or train.init_from={out}"
    )
    return out
