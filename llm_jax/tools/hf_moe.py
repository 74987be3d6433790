"""Mixtral's, Qwen1.5/2-MoE's and Qwen3-MoE's experts <-> llm_jax's MoE layers (model/moe.py), for tools/hf.py.
Per layer i and expert e, with P = model.layers.{i}.block_sparse_moe. (Mixtral) or model.layers.{i}.mlp. (Qwen):

    router [L, D, E]              <-> P gate.weight [E, D]
    moe_gate, moe_up [L, E, D, F] <-> P experts.{e}.w1.weight, w3.weight [F, D]   (Qwen3-MoE: gate_proj, up_proj)
    moe_down [L, E, F, D]         <-> P experts.{e}.w2.weight [D, F]               (Qwen3-MoE: down_proj)
    shared_gate, shared_up [L, D, S], shared_down [L, S, D] <-> P shared_expert.gate_proj ... (Qwen2-MoE)
    shared_router [L, D]          <-> P shared_expert_gate.weight [1, D]  (its sigmoid scales the shared expert)

That is the layout of their checkpoints on the Hub, and what export writes (transformers 4 reads it,
and transformers 5 converts it when it loads). Import also reads transformers 5's own fused layout:
mlp.gate.weight [E, D], mlp.experts.gate_up_proj [E, 2F, D] (the gate's F rows first),
mlp.experts.down_proj [E, D, F]. Both route as model.moe.router=softmax does: softmax over all experts,
top_k, the top_k weights renormalised to sum to 1 (Qwen3-MoE: where norm_topk_prob, model.moe.norm_topk).
A Qwen2-MoE model is told by its gated shared expert (model.moe.shared_gate), a Qwen3-MoE model by its
attention's q/k norms (model.qk_norm), anything else MoE exports as Mixtral.
"""

from __future__ import annotations

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# the experts' prefix and names of each expert's gate, up and down projections in the Hub's layout
_LEGACY = {
    "mixtral": ("model.layers.{i}.block_sparse_moe.", ("w1", "w3", "w2")),
    "qwen2_moe": ("model.layers.{i}.mlp.", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("model.layers.{i}.mlp.", ("gate_proj", "up_proj", "down_proj")),
}
_SHARED = {  # Qwen2-MoE's gated shared expert: ours -> its tensor
    "shared_gate": "mlp.shared_expert.gate_proj.weight",
    "shared_up": "mlp.shared_expert.up_proj.weight",
    "shared_down": "mlp.shared_expert.down_proj.weight",
    "shared_router": "mlp.shared_expert_gate.weight",
}
_FUSED = "model.layers.{i}.mlp."


def kind_of(model: ModelConfig) -> str:
    return "qwen2_moe" if model.moe.shared_gate else "qwen3_moe" if model.qk_norm else "mixtral"


def check_exportable(model: ModelConfig) -> None:
    """All have MoE in every layer, a softmax router and no capacity limit; only Qwen2-MoE a (gated) shared
    expert, only Qwen3-MoE q/k norms; Mixtral normalises the top_k weights."""
    m, kind = model.moe, kind_of(model)
    wants = [
        ("model.moe.every", m.every, 1),
        ("model.qk_norm", model.qk_norm, kind == "qwen3_moe"),
        ("model.moe.shared_experts", m.shared_experts > 0, kind == "qwen2_moe"),
        ("model.moe.router", m.router, "softmax"),
        ("model.moe.capacity_factor", m.capacity_factor, 0.0),
        ("model.moe.bias_update", m.bias_update, 0.0),  # its routing biases have no place there
    ] + ([("model.moe.norm_topk", m.norm_topk, True)] if kind == "mixtral" else [])
    problems = [f"{key}={value} ({ARCHITECTURES[kind]}: {want})" for key, value, want in wants if value != want]
    if problems:
        raise UserError(f"this MoE model has no {ARCHITECTURES[kind]} form to export to: " + "; ".join(problems))


def config_fields(model: ModelConfig) -> dict:
    m = model.moe
    common = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss, "output_router_logits": False}
    if kind_of(model) == "mixtral":
        return common | {
            "intermediate_size": model.expert_dim,
            "num_local_experts": m.experts,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }
    qwen = {
        "moe_intermediate_size": model.expert_dim,
        "num_experts": m.experts,
        "norm_topk_prob": m.norm_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if kind_of(model) == "qwen2_moe":
        qwen |= {"shared_expert_intermediate_size": m.shared_experts * model.expert_dim, "qkv_bias": model.qkv_bias}
    return common | qwen


def overrides(config: dict, kind: str) -> list[str]:
    """A Mixtral or Qwen3-MoE config.json -> our model.moe.* overrides (Mixtral's intermediate_size is the
    experts' width: model.mlp_dim; Qwen3-MoE's is moe_intermediate_size)."""
    experts = config.get("num_local_experts") if kind == "mixtral" else config.get("num_experts")
    experts = experts or config.get("num_local_experts")  # transformers 5 writes Qwen3-MoE's under Mixtral's name
    fields = [("num_experts_per_tok", config.get("num_experts_per_tok")), ("num_experts", experts)]
    if kind != "mixtral":
        fields.append(("moe_intermediate_size", config.get("moe_intermediate_size")))
        step, dense_layers = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
        if step != 1 or dense_layers:
            raise UserError(
                f"config.json: decoder_sparse_step={step}, mlp_only_layers={dense_layers}: llm_jax imports Qwen MoE "
                "models with experts in every layer (decoder_sparse_step 1, no mlp_only_layers)"
            )
    for field, value in fields:
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"config.json: {field}={value!r} must be a positive integer")
    out = [
        f"model.moe.experts={experts}",
        f"model.moe.top_k={config['num_experts_per_tok']}",
        f"model.moe.aux_loss={float(config.get('router_aux_loss_coef', 0.02))}",
        "model.moe.router=softmax",
        f"model.moe.norm_topk={str(kind == 'mixtral' or bool(config.get('norm_topk_prob', False))).lower()}",
    ]
    if kind == "mixtral":
        return out
    out.append(f"model.moe.mlp_dim={config['moe_intermediate_size']}")
    if kind == "qwen2_moe":
        shared, width = config.get("shared_expert_intermediate_size") or 0, config["moe_intermediate_size"]
        if shared % width:
            raise UserError(
                f"config.json: shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size="
                f"{width}: llm_jax's shared experts are model.moe.shared_experts experts of the routed ones' width"
            )
        out += [f"model.moe.shared_experts={shared // width}", f"model.moe.shared_gate={str(shared > 0).lower()}"]
    return out


def to_hf(layers: dict, n_layers: int, dtype, kind: str) -> dict[str, np.ndarray]:
    """Our stacked MoE weights -> the Hub layout's tensors of `dtype` (kind: mixtral | qwen3_moe)."""
    out, (prefix, names) = {}, _LEGACY[kind]
    router, gate, up, down = (np.asarray(layers[k]) for k in ("router", "moe_gate", "moe_up", "moe_down"))
    for i in range(n_layers):
        out[f"{prefix.format(i=i)}gate.weight"] = router[i].T
        for e in range(gate.shape[1]):
            for name, w in zip(names, (gate, up, down), strict=True):
                out[f"{prefix.format(i=i)}experts.{e}.{name}.weight"] = w[i, e].T
    for ours, theirs in _SHARED.items():
        if ours in layers:
            for i in range(n_layers):
                w = np.asarray(layers[ours][i])
                out[f"model.layers.{i}.{theirs}"] = w[None] if ours == "shared_router" else w.T
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in out.items()}


def from_hf(tensors: dict[str, np.ndarray], shapes: dict, n_layers: int, problems: list[str], kind: str) -> dict:
    """Mixtral's or Qwen3-MoE's tensors (either layout) -> our stacked router, moe_gate, moe_up, moe_down given
    their shapes ([L, ...]); a missing or misshapen tensor is added to `problems` (named) and its weight left None."""
    _, d, n_experts = shapes["router"]
    f = shapes["moe_gate"][-1]
    layers = {"router": [], "moe_gate": [], "moe_up": [], "moe_down": []}

    def take(name: str, shape: tuple[int, ...]):
        if name not in tensors:
            problems.append(f"missing tensor {name}")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        else:
            return tensors[name].astype(np.float32)
        return None

    for i in range(n_layers):
        fused, gate, up = _FUSED.format(i=i), None, None
        if f"{fused}experts.gate_up_proj" in tensors:
            router = take(f"{fused}gate.weight", (n_experts, d))
            gate_up = take(f"{fused}experts.gate_up_proj", (n_experts, 2 * f, d))
            down = take(f"{fused}experts.down_proj", (n_experts, d, f))
            if gate_up is not None:
                gate, up = gate_up[:, :f], gate_up[:, f:]
        else:
            prefix, names = _LEGACY[kind]
            router = take(prefix.format(i=i) + "gate.weight", (n_experts, d))
            gate, up, down = (
                [take(f"{prefix.format(i=i)}experts.{e}.{w}.weight", shape) for e in range(n_experts)]
                for w, shape in zip(names, ((f, d), (f, d), (d, f)), strict=True)
            )
            gate, up, down = (None if any(x is None for x in w) else np.stack(w) for w in (gate, up, down))
        if router is None or gate is None or down is None:
            continue
        layers["router"].append(router.T)
        layers["moe_gate"].append(np.swapaxes(gate, 1, 2))
        layers["moe_up"].append(np.swapaxes(up, 1, 2))
        layers["moe_down"].append(np.swapaxes(down, 1, 2))
    for ours, theirs in _SHARED.items():
        if ours in shapes:  # [L, D, S] / [L, S, D] / [L, D] <- [S, D] / [D, S] / [1, D] per layer
            shape = shapes[ours][1:]
            want = (1, shape[0]) if ours == "shared_router" else shape[::-1]
            rows = [take(f"model.layers.{i}.{theirs}", want) for i in range(n_layers)]
            if all(r is not None for r in rows):
                layers[ours] = [r[0] if ours == "shared_router" else r.T for r in rows]
    return {k: np.stack(v) if len(v) == n_layers else None for k, v in layers.items()}


def fused_names(n_layers: int) -> set[str]:
    """transformers 5's tensor names for the experts, which import reads beside the legacy ones."""
    return {
        _FUSED.format(i=i) + name
        for i in range(n_layers)
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
    }
