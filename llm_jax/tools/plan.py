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
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import Config, ModelConfig, load_config
from llm_jax.config.rules import MESH_AXES, Rules, as_tuple, rules_table
from llm_jax.errors import UserError
from llm_jax.model.attention import kernel_for
from llm_jax.model.device import compute_dtype
from llm_jax.model.loss import ACCELERATOR_CHUNK_BYTES, chunk_rows
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.chips import Chip, GiB, Topology, has_libtpu, parse_topology
from llm_jax.parallel.sharding import check_fit, mesh_shape, shards
from llm_jax.tools.compile import compile_config
from llm_jax.train.objectives import objective_of

HEADROOM = 0.85  # plan to use at most 85% of HBM: XLA temporaries, fragmentation, runtime reserve


@functools.lru_cache(maxsize=8)
def _param_arrays(model: ModelConfig) -> tuple[tuple[tuple[int, ...], tuple[str | None, ...]], ...]:
    """(shape, logical axis names) of every parameter array, from an abstract init (no memory used)."""
    boxed = jax.eval_shape(lambda: Transformer(model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return tuple((tuple(x.value.shape), tuple(x.names)) for x in leaves)


def stored_elements(shape: tuple[int, ...], platform: str) -> int:
    """Elements an array occupies: exactly its size, but on a TPU its (8, 128) tiles: the dimension
    laid out last padded to 128 and the one before it to 8 where it is longer than 8 (shorter ones
    get smaller tiles). XLA:TPU chooses the layout; the one that pads least is counted. (Checked
    against compiled arguments: tests/test_compile.py, tests/test_plan.py.)"""
    if platform != "tpu" or not shape:
        return math.prod(shape)
    best = None
    for i, minor in enumerate(shape):
        rest = shape[:i] + shape[i + 1 :]
        seconds = [(j, d) for j, d in enumerate(rest)] or [(None, 1)]
        for j, second in seconds:
            others = math.prod(d for k, d in enumerate(rest) if k != j)
            tiled = others * (second if second <= 8 else -(-second // 8) * 8) * (-(-minor // 128) * 128)
            best = tiled if best is None else min(best, tiled)
    return best


def param_bytes(model: ModelConfig, mesh: dict[str, int], rules: Rules, platform: str = "cpu") -> int:
    """float32 parameter bytes on one device: each array's shard shape from its logical axes."""
    total = 0
    for shape, names in _param_arrays(model):
        axes = nn.logical_to_mesh_axes(names, rules)
        split = [math.prod(mesh.get(a, 1) for a in as_tuple(ax)) for ax in axes]
        total += 4 * stored_elements(tuple(-(-dim // n) for dim, n in zip(shape, split)), platform)
    return total


def argument_bytes(cfg: Config, mesh: dict[str, int], platform: str = "cpu") -> int:
    """Exactly what the compiled train step takes per device: the parameters, two AdamW moments (and
    DPO's in-step reference), this device's rows of the batch, and the scalars (step, PRNG key,
    Adam's and the schedule's counts). On a TPU arrays are padded to their tiles (stored_elements)
    and a scalar takes 512 bytes."""
    rules = rules_table(cfg.mesh.rules)
    objective = objective_of(cfg)
    copies = 3 + objective.in_step_reference(cfg)
    rows = cfg.train.batch_size // shards(mesh, rules, "batch")
    batch = sum(
        v.itemsize * stored_elements((rows, *v.shape), platform) for v in objective.example_row(cfg, "train").values()
    )
    scalars = 4 * 512 if platform == "tpu" else 4 + 8 + 4 + 4
    return copies * param_bytes(cfg.model, mesh, rules, platform) + batch + scalars


def activation_bytes(
    model: ModelConfig,
    micro_batch: int,
    mesh: dict[str, int],
    rules: Rules,
    kernel: str = "xla",
    pipeline: tuple[int, int, int] = (1, 1, 1),
) -> dict[str, int]:
    """Estimated bytes on one device for one micro-batch beyond the train state: this device's layer
    weights cast to the compute dtype, what the backward pass keeps across layers, one layer's
    backward (its forward recomputed where remat drops it, and the gradients of its activations),
    a layer's weights gathered in compute dtype with their float32 gradient (where the rules split
    parameters), and the loss's logits chunk. `kernel` is the
    attention kernel that runs (attention.kernel_for): only xla materialises the T x T scores, and
    the context-parallel attention its blocks' (T / context square, or against the whole sequence).
    pipeline: (stages, micro-batches, repeats) of model/pipeline.py: a stage runs one micro-batch through a
    layer at a time, so one layer's backward holds that share of the rows, and its schedule's R M + S - 1
    ticks each save their layers' inputs (fill and drain ticks too: R M + S - 1 over R M of the rows)."""
    c = compute_dtype(model.dtype, "tpu").itemsize  # plans are for accelerators, where auto is bfloat16
    context = shards(mesh, rules, "length")  # a sequence split over the context axis: t of it here
    b, t, d = micro_batch // shards(mesh, rules, "batch"), model.seq_len // context, model.d_model
    # a pipeline stage's layers: GPipe and circular schedules keep each of them for all of its micro-batches
    # (together the rows of one micro_batch)
    L = model.n_layers // shards(mesh, rules, "layers")
    q = model.n_heads * model.head_dim // shards(mesh, rules, "heads")  # query width here
    kv = model.n_kv_heads * model.head_dim // shards(mesh, rules, "kv_heads")
    f, mlp_weights, copies = _mlp(model, mesh, rules)
    matmul_outs = b * t * (q + 2 * kv + d + 2 * f + d) * c + b * t * copies * c  # q, k, v, o, gate, up, down
    others = b * t * (2 * d + q + 2 * f + 2 * d) * c  # norms, attn out, silu*up, residuals
    scores = b * (model.n_heads // shards(mesh, rules, "heads")) * t * t * 4 if kernel == "xla" else 0
    if context > 1:  # model/context_parallel.py: a block pair's scores per ring hop, or against the whole K/V
        keys = t if model.context_parallel == "ring" else model.seq_len
        scores = b * (model.n_heads // shards(mesh, rules, "heads")) * t * keys * 4
    layer = matmul_outs + others + scores  # one layer's forward, nothing recomputed
    S, M, R = pipeline
    kept = {"full": b * t * d * c, "dots": b * t * d * c + matmul_outs, "none": layer}[model.remat]
    v = model.vocab_size // shards(mesh, rules, "vocab")
    rows = chunk_rows(b * t, model.vocab_size, ACCELERATOR_CHUNK_BYTES)
    weights = d * (q + 2 * kv) + q * d + mlp_weights  # one layer's matrices, as the tensor and expert axes leave them
    gathered = shards(mesh, rules, "embed") > 1  # ZeRO-3: each layer's weights are all-gathered for use
    local = weights * L // (shards(mesh, rules, "embed") if gathered else 1)  # this device's layer weights
    return {
        "layer weights in compute dtype": local * c if c < 4 else 0,  # the cast XLA hoists out of the layer loop
        "saved across layers": L * kept * (R * M + S - 1) // (R * M),
        "one layer's backward": (layer if model.remat == "none" else 2 * layer) // M,
        "a gathered layer + its gradient": weights * (c + 4) if gathered else 0,
        "logits chunk": rows * v * (4 + 4 + c),  # logits, softmax, d_logits
        "embedding table for the lookup": model.vocab_size * d * c,
    }  # gathered whole (transformer.py)


def _mlp(model: ModelConfig, mesh: dict[str, int], rules: Rules) -> tuple[int, int, int]:
    """A layer's MLP on one device, averaged over the dense and MoE layers: (the hidden width a token's rows
    take here, the layer's MLP weights here, extra values per token for an MoE layer's routed copies). Under
    expert parallelism each device holds the copies of the whole expert group in buffers sized for any routing
    (model/moe.py): top_k x the expert axis rows per local token, each with its input, output and hidden."""
    tensor, dense = shards(mesh, rules, "mlp"), model.mlp_dim // shards(mesh, rules, "mlp")
    if not model.moe.experts:
        return dense, 3 * model.d_model * dense, 0
    m, share = model.moe, 1 / model.moe.every  # the share of layers that are MoE
    ep, fe = shards(mesh, rules, "experts"), model.expert_dim // tensor
    routed = m.top_k * ep  # copies per local token in this device's buffers
    width = m.shared_experts * fe + routed * fe  # per local token
    weights = 3 * model.d_model * fe * (m.experts // ep + m.shared_experts) + model.d_model * m.experts
    copies = routed * 2 * model.d_model  # each copy's input and output rows
    mixed = lambda moe, dense: round(share * moe + (1 - share) * dense)  # noqa: E731
    return mixed(width, dense), mixed(weights, 3 * model.d_model * dense), mixed(copies, 0)


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


def train_kernel(cfg: Config, chip: Chip) -> str:
    """The attention kernel cfg's train step runs on this chip (packed rows: the objective's data has segments)."""
    packed = "segments" in objective_of(cfg).example_row(cfg, "train")
    m = cfg.model
    return kernel_for(
        m.attention, chip.platform, chip.device_kind, m.seq_len, packed, compute_dtype(m.dtype, chip.platform)
    )


def plan_for(cfg: Config, chip: Chip, mesh: dict[str, int]) -> Plan:
    rules = rules_table(cfg.mesh.rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    stages = mesh.get("pipeline", 1)  # micro-batches and repeats as MeshConfig's, for this mesh's stages
    pipeline = (stages, cfg.mesh.microbatches or stages, max(cfg.mesh.pipeline_repeats, 1)) if stages > 1 else (1, 1, 1)
    check_fit(mesh, rules, cfg.model, micro // pipeline[1])
    params = param_bytes(cfg.model, mesh, rules, chip.platform)
    rows = {"parameters (f32)": params, "gradients (f32)": params, "AdamW moments (2 x f32)": 2 * params}
    if objective_of(cfg).in_step_reference(cfg):
        rows["DPO reference parameters (f32)"] = params
    model = dataclasses.replace(cfg.model, dtype=compute_dtype(cfg.model.dtype, chip.platform).name)
    rows |= activation_bytes(model, micro, mesh, rules, train_kernel(cfg, chip), pipeline)
    return Plan(mesh, rows, chip.hbm)


def suggest(cfg: Config, chip: Chip, chips: int) -> tuple[Plan, int] | None:
    """The fitting mesh with the most data parallelism, then the least tensor parallelism, at the
    fewest micro-batches (train.grad_accum) that fit (an MoE model's expert axis tried at each divisor of
    its experts); None if no mesh fits even one sequence per chip."""
    accum = cfg.train.grad_accum
    while cfg.train.batch_size % accum == 0:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
        best = None
        experts = cfg.model.moe.experts
        for tensor, ep in (
            (t, e)
            for t in (1, 2, 4, 8)
            for e in range(1, max(experts, 1) + 1)
            if t <= chip.per_host and max(experts, 1) % e == 0 and chips % (t * e) == 0
        ):
            for fsdp in (n for n in range(1, chips // tensor // ep + 1) if chips // tensor // ep % n == 0):
                mesh = {"data": chips // tensor // ep // fsdp, "fsdp": fsdp, "tensor": tensor}
                mesh |= {"expert": ep} if experts else {}
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


def format_plan(plan: Plan, title: str, compiled: dict | None = None) -> str:
    """The estimate's rows; with `compiled` (XLA:TPU's memory of the same train step) beside it."""
    lines = [title + ("  (estimate; compiled figures below)" if compiled else "  (estimate)")]
    lines += [f"  {k:32} {_size(v):>12}" for k, v in plan.rows.items()]
    lines.append(
        f"  {'total':32} {_size(plan.total):>12}   of {plan.hbm / GiB:.0f} GiB HBM: "
        + ("fits" if plan.fits else f"does NOT fit (the plan keeps {1 - HEADROOM:.0%} headroom)")
    )
    if compiled:
        fits = "fits" if compiled["peak"] <= plan.hbm else "does NOT fit"
        lines.append(
            f"  compiled by XLA:TPU: arguments {_size(compiled['arguments'])}, temporaries "
            f"{_size(compiled['temporaries'])}, peak {_size(compiled['peak'])} of {plan.hbm / GiB:.0f} GiB: {fits} "
            f"(the estimate is {plan.total / compiled['peak'] - 1:+.0%} off)"
        )
    return "\n".join(lines)


def _compiled(cfg: Config, topology: Topology, mesh: dict[str, int], accum: int | None = None) -> dict | None:
    """The train step's memory from the TPU compiler where it can run here (a TPU topology and libtpu);
    None where it cannot, or where compiling fails (the reason is printed, the estimate still shown)."""
    if not (topology.chip.torus_dims and has_libtpu()):
        return None
    trial = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh))
    if accum is not None:  # a suggestion: data x fsdp x tensor over all chips, no pipeline
        trial = dataclasses.replace(
            trial,
            mesh=dataclasses.replace(trial.mesh, pipeline=1, dcn_data=topology.slices),
            train=dataclasses.replace(cfg.train, grad_accum=accum),
        )
    try:
        (report,) = compile_config(trial, topology, ("train",))
    except UserError as e:
        print(f"  (not compiled: {e})")
        return None
    return report.memory


def _pipeline(mesh) -> str:
    if mesh.pipeline == 1:
        return ""
    schedule = f"circular, {mesh.pipeline_repeats} repeats" if mesh.pipeline_repeats > 1 else "GPipe"
    return (
        f" | pipeline {mesh.pipeline} stages x {mesh.pipeline_microbatches} micro-batches ({schedule}): "
        f"bubble {mesh.pipeline_bubble:.1%}"
    )


def main(args) -> None:
    cfg = load_config(args.config, args.overrides)
    topology = parse_topology(args.topology, args.slices)
    chip, chips = topology.chip, topology.devices
    mesh = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, chips)))
    m, t = cfg.model, cfg.train
    compile_here = not args.estimate and topology.chip.torus_dims and has_libtpu()
    if compile_here or not topology.chip.torus_dims:
        how = ""
    else:
        how = " | estimate only" + (" (--estimate)" if args.estimate else " (pip install 'llm_jax[tpu]' to compile)")
    print(
        f"{topology.describe()} x {chip.hbm / GiB:.0f} GiB | {m.n_layers} layers, d_model {m.d_model}, "
        f"seq {m.seq_len}, {compute_dtype(m.dtype, chip.platform).name}, remat {m.remat}, "
        f"attention {train_kernel(cfg, chip)} | batch {t.batch_size}, "
        f"grad_accum {t.grad_accum} | rules {cfg.mesh.rules}{_pipeline(cfg.mesh)}{how}"
    )
    try:
        plan = plan_for(cfg, chip, mesh)
        print(
            format_plan(plan, f"mesh {mesh} (the config's):", _compiled(cfg, topology, mesh) if compile_here else None)
        )
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
    same = best.mesh == {k: mesh[k] for k in best.mesh} and accum == t.grad_accum
    compiled = _compiled(cfg, topology, best.mesh, accum) if compile_here and not same else None
    print(format_plan(best, f"suggested: {settings}", compiled))
