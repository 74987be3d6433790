"""Hugging Face checkpoints (Llama 2/3, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE): `llm-jax export-hf` / `import-hf`.

Our model is the Llama architecture, so the conversion is a renaming and a transpose. Our weights
are [*in, *out] (stacked over layers); Hugging Face's linear weights are [out, in] per layer:

    wq [L, D, N, H] <-> model.layers.{i}.self_attn.q_proj.weight [N*H, D]   (k_proj, v_proj: K heads)
    wo [L, N, H, D] <-> model.layers.{i}.self_attn.o_proj.weight [D, N*H]
    w_gate, w_up [L, D, F] <-> mlp.gate_proj / mlp.up_proj.weight [F, D];  w_down [L, F, D] <-> [D, F]
    attn_norm, mlp_norm [L, D] <-> input_layernorm, post_attention_layernorm.weight [D]
    q_bias [L, N, H], k_bias, v_bias [L, K, H] <-> self_attn.q_proj.bias [N*H], k_proj, v_proj (Qwen2)
    q_norm, k_norm [L, H] <-> self_attn.q_norm.weight, k_norm.weight [H] (Qwen3; head_dim its own)
    embedding [V, D] <-> model.embed_tokens.weight;  final_norm <-> model.norm.weight;
    lm_head [V, D] <-> lm_head.weight (absent when tied)
    router, moe_gate, moe_up, moe_down (an MoE model) <-> Mixtral's or Qwen3-MoE's experts (tools/hf_moe.py)

RoPE needs no permutation: apply_rope pairs the two halves of each head, as HF's rotate_half does.
Llama 3.1's rope_scaling (type llama3) becomes model.rope_scaling. An imported run computes in
float32 when the checkpoint's torch_dtype is float32 (exact parity), otherwise in bfloat16
(model.dtype; parameters are float32 either way, which holds bfloat16 and float16 values exactly, so
`export-hf --dtype` of the original dtype gives back the original tensors bit for bit). An import
keeps the model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json with its
chat template, generation_config.json), and an export of it writes them back unchanged. A run trained
here exports its sentencepiece model with a LlamaTokenizer config that adds <|endoftext|> as BOS
before the text (as llm_jax does before every prompt and document) and our chat template.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import load_config
from llm_jax.data.tokenizer import CHAT_TOKENS, copy_tokenizer, load_tokenizer
from llm_jax.errors import UserError
from llm_jax.model.dense import IN_DIMS
from llm_jax.parallel.sharding import abstract_params, inference_layout, single_device_layout
from llm_jax.run import load_config_of, load_run, write_params_run
from llm_jax.tools import hf_moe
from llm_jax.tools.chat_tokens import add_chat_tokens, grow_embeddings, grown_vocab
from llm_jax.tools.hf_files import read_safetensors, write_our_tokenizer, write_safetensors

LAYER_NAMES = {
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
TOP_NAMES = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
} | hf_moe.ARCHITECTURES
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def to_hf_tensors(params: dict, n_layers: int, dtype=np.float32, kind: str = "llama") -> dict[str, np.ndarray]:
    """Our float params -> {HF tensor name: array of `dtype`} (kind: the model_type, naming an MoE's experts)."""
    out = {hf: np.asarray(params[ours]).astype(dtype) for ours, hf in TOP_NAMES.items() if ours in params}
    for ours, hf in LAYER_NAMES.items():
        if ours not in params["layers"]:
            continue
        stacked = np.asarray(params["layers"][ours])
        for i in range(n_layers):
            w = stacked[i]
            if ours in IN_DIMS:  # [*in, *out] -> [out, in]
                w = w.reshape(math.prod(w.shape[: IN_DIMS[ours]]), -1).T
            out[f"model.layers.{i}.{hf}"] = np.ascontiguousarray(w.reshape(-1) if "bias" in ours else w).astype(dtype)
    if "router" in params["layers"]:
        out |= hf_moe.to_hf(params["layers"], n_layers, dtype, kind)
    return out


def from_hf_tensors(tensors: dict[str, np.ndarray], shapes: dict, n_layers: int, kind: str = "llama") -> dict:
    """{HF name: array} -> our params, given our shapes (a tree like the params); each missing or
    misshapen tensor is named, all at once."""
    problems, params, layers = [], {}, {}

    def take(name: str, shape: tuple[int, ...], in_dims: int):
        if name not in tensors:
            problems.append(f"missing tensor {name}")
            return None
        w = tensors[name]
        want = shape if not in_dims else (math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))
        if name.endswith(".bias"):
            want = (math.prod(shape),)
        if tuple(w.shape) != want:
            problems.append(f"tensor {name} has shape {tuple(w.shape)}, expected {want}")
            return None
        return (w.T if in_dims else w).reshape(shape).astype(np.float32)

    for ours, hf in TOP_NAMES.items():
        if ours in shapes:
            params[ours] = take(hf, shapes[ours], 0)
    for ours, hf in LAYER_NAMES.items():
        if ours not in shapes["layers"]:
            continue
        shape = shapes["layers"][ours][1:]
        rows = [take(f"model.layers.{i}.{hf}", shape, IN_DIMS.get(ours, 0)) for i in range(n_layers)]
        layers[ours] = None if any(r is None for r in rows) else np.stack(rows)
    if "router" in shapes["layers"]:
        layers |= hf_moe.from_hf(tensors, shapes["layers"], n_layers, problems, kind)
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise UserError("the checkpoint does not match its config.json:\n  - " + "\n  - ".join(shown))
    return {**params, "layers": layers}


def export_kind(model) -> str:
    """The Hugging Face model_type our ModelConfig exports as: Mixtral or Qwen3-MoE (q/k norms) for an MoE
    model, Qwen3 with q/k norms, Qwen2 with q/k/v biases, else Llama."""
    if model.qkv_bias and (model.qk_norm or (model.moe.experts and not model.moe.shared_gate)):
        raise UserError(
            "model.qkv_bias with model.qk_norm, or with experts but no shared_gate, has no Hugging Face form to "
            "export to (Qwen3's attention_bias adds an output bias llm_jax does not have; Mixtral has none)"
        )
    if model.moe.experts:
        hf_moe.check_exportable(model)
        return hf_moe.kind_of(model)
    return "qwen3" if model.qk_norm else "qwen2" if model.qkv_bias else "llama"


def hf_config(model, tokenizer, pad_id: int | None, eos_ids: list[int], dtype: str) -> dict:
    """Our ModelConfig -> a config.json of its export_kind."""
    kind = export_kind(model)
    scaling = None
    if model.rope_scaling:
        factor, low, high, context = model.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": int(context),
        }
    config = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
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
        "rope_scaling": scaling,
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if kind == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    if kind in hf_moe.ARCHITECTURES:
        config |= hf_moe.config_fields(model)
    if kind.startswith("qwen"):
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.n_layers}
    if kind.startswith("qwen3"):
        config |= {"attention_bias": False}
    return config


def model_overrides(config: dict, path: Path, seq_len: int | None) -> list[str]:
    """An HF config.json -> our model.* overrides; an unsupported feature names its field."""

    def need(field, ok, why):
        if not ok:
            raise UserError(f"{path}: {field}={config.get(field)!r} is not supported ({why})")

    kind = config.get("model_type")
    need("model_type", kind in ARCHITECTURES, f"llm_jax imports {', '.join(ARCHITECTURES)}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        need(field, isinstance(config.get(field), int) and config[field] > 0, "a positive integer is required")
    d, n = config["hidden_size"], config["num_attention_heads"]
    k = config.get("num_key_value_heads") or n
    need("num_key_value_heads", isinstance(k, int) and n % k == 0, "it must divide num_attention_heads")
    head_dim = config.get("head_dim") or (d // n if d % n == 0 else None)
    need(
        "head_dim",
        isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0,
        "a positive even integer is needed, or hidden_size divisible by num_attention_heads",
    )
    need("hidden_act", config.get("hidden_act", "silu") == "silu", "the MLP is SwiGLU")
    need("attention_bias", not config.get("attention_bias"), "only Qwen2's q/k/v biases are implemented")
    need("mlp_bias", not config.get("mlp_bias"), "the MLP has no bias")
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    need("rope_scaling", rope_type in ("default", "llama3"), "plain RoPE and Llama 3.1's llama3 scaling are")
    rope_scaling = []
    if rope_type == "llama3":
        rope_scaling = [
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            float(scaling["original_max_position_embeddings"]),
        ]
    theta = config.get("rope_theta", scaling.get("rope_theta", 10000.0))
    context = seq_len or min(config.get("max_position_embeddings", 2048), 4096)
    dtype = config.get("torch_dtype", config.get("dtype", "bfloat16"))  # compute as stored: float32 stays exact
    window = config.get("sliding_window") if config.get("use_sliding_window", not kind.startswith("qwen")) else None
    need(
        "sliding_window",
        window is None or window >= context,
        f"attention is full; pass --seq-len {window} or less to import it",
    )
    moe = hf_moe.overrides(config, kind) if kind in hf_moe.ARCHITECTURES else []
    return moe + [
        f"model.vocab_size={config['vocab_size']}",
        f"model.d_model={d}",
        f"model.n_layers={config['num_hidden_layers']}",
        f"model.n_heads={n}",
        f"model.n_kv_heads={k}",
        f"model.head_dim={head_dim}",
        f"model.mlp_dim={config['intermediate_size']}",
        f"model.seq_len={context}",
        f"model.rope_theta={float(theta)}",
        f"model.rope_scaling={rope_scaling}",
        f"model.qkv_bias={str(kind == 'qwen2' or (kind == 'qwen2_moe' and config.get('qkv_bias', True))).lower()}",
        f"model.qk_norm={str(kind.startswith('qwen3')).lower()}",
        f"model.norm_eps={float(config.get('rms_norm_eps', 1e-6))}",
        f"model.tie_embeddings={str(bool(config.get('tie_word_embeddings', False))).lower()}",
        f"model.init_std={float(config.get('initializer_range', 0.02))}",
        "model.dropout=0.0",
        f"model.dtype={'float32' if dtype == 'float32' else 'bfloat16'}",
    ]


def export_hf(
    run_dir: str, out_dir: str, shard_bytes: int = 2000 << 20, mesh: str = "1,1,1", dtype: str = "float32", log=print
) -> Path:
    """The float32 parameters are read split over --mesh and gathered to the host one tensor at a time,
    then written in `dtype` (float32, bfloat16 or float16)."""
    run = load_run(run_dir, inference_layout(load_config_of(run_dir), mesh))
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    if cfg.model.quant != "none":
        raise UserError(f"{run_dir} holds {cfg.model.quant} weights; export the float run it was quantized from")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    kind = export_kind(cfg.model)
    out = Path(out_dir).expanduser()
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --out")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = to_hf_tensors(params, cfg.model.n_layers, DTYPES[dtype], kind)
    write_safetensors(tensors, tmp, shard_bytes)
    imported = (tokenizer.path.parent / "tokenizer_config.json").is_file()
    if imported:  # the model's own files, as they came
        copy_tokenizer(tokenizer.path, tmp)
        eos_ids, pad_id = list(tokenizer.stop_ids), None
    else:
        eos_ids, pad_id = write_our_tokenizer(tokenizer, cfg.model.seq_len, tmp)
    config = hf_config(cfg.model, tokenizer, pad_id, eos_ids, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if not (tmp / "generation_config.json").is_file():
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
    tmp.rename(out)
    log(
        f"exported {run_dir} ({run.step} steps) -> {out} ({config['architectures'][0]}, {dtype}, "
        f"{sum(w.size for w in tensors.values()):,} parameters)"
    )
    return out


def import_hf(hf_dir: str, out_dir: str, seq_len: int | None = None, chat_tokens: bool = False, log=print) -> Path:
    """chat_tokens: add our chat format's tokens to a base model without a template (chat_tokens.py)."""
    src, out = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a Hugging Face model directory (no config.json)")
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --out")
    try:
        config = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{src / 'config.json'}: malformed JSON ({e})") from None
    tokenizer = load_tokenizer(_tokenizer_file(src))  # a clear error now if it is not usable
    cfg = load_config(None, [f"run_dir={out}", *model_overrides(config, src / "config.json", seq_len)])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.model.vocab_size}")
    shapes = jax.tree_util.tree_map(lambda a: a.shape, abstract_params(cfg.model, single_device_layout()))
    tensors = read_safetensors(src)
    if cfg.model.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    kind = config["model_type"]
    params = from_hf_tensors(tensors, shapes, cfg.model.n_layers, kind)
    expected = set(to_hf_tensors(params, cfg.model.n_layers, kind=kind)) | hf_moe.fused_names(cfg.model.n_layers)
    unexpected = sorted(k for k in tensors if k not in expected and "rotary_emb" not in k)
    if unexpected:
        raise UserError(
            f"{src}: tensors llm_jax's model has no place for: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    if not chat_tokens:
        write_params_run(out, cfg, params, "0", _tokenizer_file(src))
    else:
        with tempfile.TemporaryDirectory() as staged:
            tokenizer = add_chat_tokens(tokenizer, Path(staged))
            new_ids = [tokenizer.piece_id(t) for t in CHAT_TOKENS]
            vocab = grown_vocab(cfg.model.vocab_size, tokenizer.vocab_size)
            params = grow_embeddings(params, new_ids, vocab)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
            write_params_run(out, cfg, params, "0", tokenizer.path)
    chat = (
        "llm_jax's chat tokens and template, the tokens untrained until SFT"
        if chat_tokens
        else "its own chat template"
        if tokenizer.chat_template
        else "no chat template: generate and serve completions; --chat-tokens to fine-tune it for chat"
    )
    log(
        f"imported {src} -> {out} ({config['model_type']}, {cfg.model.n_layers} layers, d_model "
        f"{cfg.model.d_model}, context {cfg.model.seq_len}, {type(tokenizer).__name__} with {chat}); "
        f"use it with generate, chat, serve or train.init_from={out}"
    )
    return out


def _tokenizer_file(src: Path) -> Path:
    """A model's sentencepiece tokenizer.model where it has one (Llama 2, Mistral 7B), else its tokenizer.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (src / name).is_file():
            return src / name
    raise UserError(f"{src} has no tokenizer (tokenizer.json or a sentencepiece tokenizer.model)")
