"""Mixtral's experts <-> llm_jax's MoE layers (model/moe.py), for tools/hf.py. Per layer i and expert e:

    router [L, D, E]          <-> model.layers.{i}.block_sparse_moe.gate.weight [E, D]
    moe_gate, moe_up [L, E, D, F] <-> block_sparse_moe.experts.{e}.w1.weight, w3.weight [F, D]
    moe_down [L, E, F, D]     <-> block_sparse_moe.experts.{e}.w2.weight [D, F]

That is the layout of Mixtral's checkpoints on the Hub, and what export writes (transformers 4 reads it,
and transformers 5 converts it when it loads). Import also reads transformers 5's own fused layout:
mlp.gate.weight [E, D], mlp.experts.gate_up_proj [E, 2F, D] (the gate's F rows first),
mlp.experts.down_proj [E, D, F]. Mixtral routes as model.moe.router=softmax does: softmax over all
experts, top_k, the top_k weights renormalised to sum to 1.
"""

from __future__ import annotations

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError

ARCHITECTURE = "MixtralForCausalLM"
_LEGACY = "model.layers.{i}.block_sparse_moe."
_FUSED = "model.layers.{i}.mlp."


def check_exportable(model: ModelConfig) -> None:
    """Mixtral has MoE in every layer, no shared experts, a softmax router and no capacity limit."""
    m = model.moe
    problems = [
        f"{key}={value} (Mixtral: {want})"
        for key, value, want in (
            ("model.moe.every", m.every, 1),
            ("model.moe.shared_experts", m.shared_experts, 0),
            ("model.moe.router", m.router, "softmax"),
            ("model.moe.capacity_factor", m.capacity_factor, 0.0),
        )
        if value != want
    ]
    if problems:
        raise UserError("this MoE model has no Mixtral form to export to: " + "; ".join(problems))


def config_fields(model: ModelConfig) -> dict:
    m = model.moe
    return {
        "intermediate_size": model.expert_dim,
        "num_local_experts": m.experts,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def overrides(config: dict) -> list[str]:
    """A Mixtral config.json -> our model.moe.* overrides (intermediate_size is the experts' width: model.mlp_dim)."""
    experts, top_k = config.get("num_local_experts"), config.get("num_experts_per_tok")
    for field, value in (("num_local_experts", experts), ("num_experts_per_tok", top_k)):
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"config.json: {field}={value!r} must be a positive integer")
    return [
        f"model.moe.experts={experts}",
        f"model.moe.top_k={top_k}",
        f"model.moe.aux_loss={float(config.get('router_aux_loss_coef', 0.02))}",
        "model.moe.router=softmax",
    ]


def to_hf(layers: dict, n_layers: int, dtype) -> dict[str, np.ndarray]:
    """Our stacked MoE weights -> Mixtral's tensors of `dtype`."""
    out = {}
    router, gate, up, down = (np.asarray(layers[k]) for k in ("router", "moe_gate", "moe_up", "moe_down"))
    for i in range(n_layers):
        prefix = _LEGACY.format(i=i)
        out[f"{prefix}gate.weight"] = router[i].T
        for e in range(gate.shape[1]):
            out[f"{prefix}experts.{e}.w1.weight"] = gate[i, e].T
            out[f"{prefix}experts.{e}.w3.weight"] = up[i, e].T
            out[f"{prefix}experts.{e}.w2.weight"] = down[i, e].T
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in out.items()}


def from_hf(tensors: dict[str, np.ndarray], shapes: dict, n_layers: int, problems: list[str]) -> dict:
    """Mixtral's tensors (either layout) -> our stacked router, moe_gate, moe_up, moe_down given their shapes
    ([L, ...]); a missing or misshapen tensor is added to `problems` (named) and its weight left None."""
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
            legacy = _LEGACY.format(i=i) + "experts.{e}."
            router = take(_LEGACY.format(i=i) + "gate.weight", (n_experts, d))
            gate, up, down = (
                [take(legacy.format(e=e) + f"{w}.weight", shape) for e in range(n_experts)]
                for w, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f)))
            )
            gate, up, down = (None if any(x is None for x in w) else np.stack(w) for w in (gate, up, down))
        if router is None or gate is None or down is None:
            continue
        layers["router"].append(router.T)
        layers["moe_gate"].append(np.swapaxes(gate, 1, 2))
        layers["moe_up"].append(np.swapaxes(up, 1, 2))
        layers["moe_down"].append(np.swapaxes(down, 1, 2))
    return {k: np.stack(v) if len(v) == n_layers else None for k, v in layers.items()}


def fused_names(n_layers: int) -> set[str]:
    """transformers 5's tensor names for the experts, which import reads beside the legacy ones."""
    return {
        _FUSED.format(i=i) + name
        for i in range(n_layers)
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
    }
