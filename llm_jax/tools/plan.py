"""`llm-jax plan`: per-device memory of a training config on a topology, without the hardware.

Parameters, gradients and AdamW moments are counted exactly, per array, from the model's real
parameter tree and the config's real rules table (the same arithmetic as the shardings the train
step gets). Activations are an estimate from the shapes and the remat policy (what the backward
pass keeps per layer, plus one layer's working set while it is recomputed); XLA's buffer
assignment adds fusion temporaries and fragmentation, which the headroom covers. On a real
compile (tests/test_plan.py) the state part matches XLA's memory analysis to the byte.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import Config, ModelConfig, load_config
from llm_jax.config.rules import MESH_AXES, Rules, as_tuple, rules_table
from llm_jax.errors import UserError
from llm_jax.model.loss import ACCELERATOR_CHUNK_BYTES, chunk_rows
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import check_fit, mesh_shape, shards

GiB = 2**30
HEADROOM = 0.85  # plan to use at most 85% of HBM: XLA temporaries, fragmentation, runtime reserve


@dataclass(frozen=True)
class Chip:
    hbm: int  # bytes of HBM per chip
    flops: float  # dense bf16 FLOP/s per chip
    per_host: int  # chips that share a host's fast links (where tensor parallelism belongs)
    cores_per_chip: int  # v4 and v5p slice names count TensorCores, two per chip


# Vendor figures: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, nvidia.com H100/H200/A100 datasheets (SXM).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 4, 2),
    "v5p": Chip(95 * GiB, 459e12, 4, 2),
    "v5e": Chip(16 * GiB, 197e12, 8, 1),
    "v6e": Chip(32 * GiB, 918e12, 8, 1),
    "a100": Chip(80 * GiB, 312e12, 8, 1),
    "h100": Chip(80 * GiB, 989e12, 8, 1),
    "h200": Chip(141 * GiB, 989e12, 8, 1),
}


def parse_topology(name: str) -> tuple[Chip, int]:
    """'v5p-256' -> (v5p, 128 chips); 'v5e-64' -> (v5e, 64); 'h100-8' -> (h100, 8)."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.lower().replace("v5litepod", "v5e"))
    if not m or m.group(1) not in CHIPS:
        raise UserError(
            f"unknown topology {name!r}: use <kind>-<size> with kind one of {', '.join(CHIPS)} "
            "(e.g. v5p-256, v5e-64, h100-8)"
        )
    chip, size = CHIPS[m.group(1)], int(m.group(2))
    if size % chip.cores_per_chip or size == 0:
        raise UserError(
            f"{name}: {m.group(1)} slice names count TensorCores ({chip.cores_per_chip} per chip); "
            f"the size must be a positive multiple of {chip.cores_per_chip}"
        )
    return chip, size // chip.cores_per_chip


@functools.lru_cache(maxsize=8)
def _param_arrays(model: ModelConfig) -> tuple[tuple[tuple[int, ...], tuple[str | None, ...]], ...]:
    """(shape, logical axis names) of every parameter array, from an abstract init (no memory used)."""
    boxed = jax.eval_shape(lambda: Transformer(model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return tuple((tuple(x.value.shape), tuple(x.names)) for x in leaves)


def param_bytes(model: ModelConfig, mesh: dict[str, int], rules: Rules) -> int:
    """float32 parameter bytes on one device: each array's shard shape from its logical axes."""
    total = 0
    for shape, names in _param_arrays(model):
        axes = nn.logical_to_mesh_axes(names, rules)
        split = [math.prod(mesh.get(a, 1) for a in as_tuple(ax)) for ax in axes]
        total += 4 * math.prod(-(-dim // n) for dim, n in zip(shape, split))
    return total


def activation_bytes(model: ModelConfig, micro_batch: int, mesh: dict[str, int], rules: Rules) -> dict[str, int]:
    """Estimated activation bytes on one device for one micro-batch: kept for the backward pass
    across layers, one layer's working set, and the loss's logits chunk."""
    c = jnp.dtype(model.dtype).itemsize
    b, t, d = micro_batch // shards(mesh, rules, "batch"), model.seq_len, model.d_model
    L = model.n_layers // shards(mesh, rules, "layers")  # a pipeline stage's layers (GPipe keeps all of its
    #                                                       micro-batches: together the rows of one micro_batch)
    q = model.n_heads * model.head_dim // shards(mesh, rules, "heads")  # query width here
    kv = model.n_kv_heads * model.head_dim // shards(mesh, rules, "kv_heads")
    f = model.mlp_dim // shards(mesh, rules, "mlp")
    matmul_outs = b * t * (q + 2 * kv + d + 2 * f + d) * c  # q, k, v, o, gate, up, down
    others = b * t * (2 * d + q + 2 * f + 2 * d) * c  # norms, attn out, silu*up, residuals
    scores = b * (model.n_heads // shards(mesh, rules, "heads")) * t * t * 4 if model.attention == "xla" else 0
    layer = matmul_outs + others + scores  # one layer, nothing recomputed
    kept = {"full": b * t * d * c, "dots": b * t * d * c + matmul_outs, "none": layer}[model.remat]
    v = model.vocab_size // shards(mesh, rules, "vocab")
    rows = chunk_rows(b * t, model.vocab_size, ACCELERATOR_CHUNK_BYTES)
    return {
        "saved across layers": L * kept,
        "one layer's working set": 0 if model.remat == "none" else layer,
        "logits chunk": rows * v * (4 + 4 + c),  # logits, softmax, d_logits
        "embedding table for the lookup": model.vocab_size * d * c,
    }  # gathered whole (transformer.py)


@dataclass
class Plan:
    mesh: dict[str, int]
    rows: dict[str, int]  # what -> bytes per device
    hbm: int

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.hbm


def plan_for(cfg: Config, chip: Chip, mesh: dict[str, int]) -> Plan:
    rules = rules_table(cfg.mesh.rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    check_fit(mesh, rules, cfg.model, micro // cfg.mesh.pipeline_microbatches)
    params = param_bytes(cfg.model, mesh, rules)
    rows = {"parameters (f32)": params, "gradients (f32)": params, "AdamW moments (2 x f32)": 2 * params}
    rows |= activation_bytes(cfg.model, micro, mesh, rules)
    return Plan(mesh, rows, chip.hbm)


def suggest(cfg: Config, chip: Chip, chips: int) -> tuple[Plan, int] | None:
    """The fitting mesh with the most data parallelism, then the least tensor parallelism, at the
    fewest micro-batches (train.grad_accum) that fit; None if no mesh fits even one sequence per chip."""
    accum = cfg.train.grad_accum
    while cfg.train.batch_size % accum == 0:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
        best = None
        for tensor in (t for t in (1, 2, 4, 8) if t <= chip.per_host and chips % t == 0):
            for fsdp in (n for n in range(1, chips // tensor + 1) if chips // tensor % n == 0):
                mesh = {"data": chips // tensor // fsdp, "fsdp": fsdp, "tensor": tensor}
                try:
                    plan = plan_for(dataclasses.replace(trial, mesh=dataclasses.replace(cfg.mesh, **mesh)), chip, mesh)
                except UserError:
                    continue
                if plan.fits and (best is None or (mesh["data"], -tensor) > (best.mesh["data"], -best.mesh["tensor"])):
                    best = plan
        if best is not None:
            return best, accum
        accum *= 2
    return None


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def format_plan(plan: Plan, title: str) -> str:
    lines = [title] + [f"  {k:32} {_size(v):>12}" for k, v in plan.rows.items()]
    lines.append(
        f"  {'total':32} {_size(plan.total):>12}   of {plan.hbm / GiB:.0f} GiB HBM: "
        + ("fits" if plan.fits else f"does NOT fit (the plan keeps {1 - HEADROOM:.0%} headroom)")
    )
    return "\n".join(lines)


def main(args) -> None:
    cfg = load_config(args.config, args.overrides)
    chip, chips = parse_topology(args.topology)
    mesh = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, chips)))
    m, t = cfg.model, cfg.train
    print(
        f"{args.topology}: {chips} chips x {chip.hbm / GiB:.0f} GiB | {m.n_layers} layers, d_model {m.d_model}, "
        f"seq {m.seq_len}, {m.dtype}, remat {m.remat} | batch {t.batch_size}, grad_accum {t.grad_accum} "
        f"| rules {cfg.mesh.rules}"
    )
    try:
        print(format_plan(plan_for(cfg, chip, mesh), f"mesh {mesh} (the config's):"))
    except UserError as e:
        print(f"mesh {mesh} (the config's): {e}")
    found = suggest(cfg, chip, chips)
    if found is None:
        print(
            f"suggested: nothing fits {chips} chips with rules {cfg.mesh.rules}, even one sequence per chip: "
            "use more chips, model.remat=full, or rules that split more (fsdp_tp)"
        )
        return
    best, accum = found
    settings = " ".join(f"mesh.{k}={v}" for k, v in best.mesh.items()) + f" train.grad_accum={accum}"
    print(format_plan(best, f"suggested: {settings}"))
