"""`llm-jax compile`: a config's steps compiled for a TPU topology by the real XLA TPU compiler
(libtpu), or for NVIDIA GPUs by XLA:GPU (jax's CUDA plugin), on any machine without them: memory,
FLOPs, HBM traffic and collectives per device, and a roofline.

The train step (the config's objective, pipeline, slices and grad_accum included), its eval step,
the contiguous-cache prefill and decode steps (generate, chat, eval, serve --batching static) and the
paged ones of continuous batching (serve; on TPU its decode runs the Pallas paged-attention kernel)
are traced with abstract arguments on a mesh of abstract
devices (jax.experimental.topologies), lowered and compiled; no array is ever created there.
Memory is XLA's buffer assignment. The roofline is an estimate: the step takes at least its FLOPs
at the chip's peak, its HBM bytes at the HBM bandwidth and its collective bytes at the chip's link
bandwidth, whichever is longest (perfect overlap, no launch or DCN cost).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.config import Config, load_config
from llm_jax.config.rules import MESH_AXES
from llm_jax.errors import UserError
from llm_jax.inference.blocks import blocks_per_shard
from llm_jax.inference.generate import serving_steps
from llm_jax.inference.paged import DECODE_STATIC, PREFILL_STATIC, paged_steps
from llm_jax.model.attention import prebuild_splash
from llm_jax.model.dense import inference_params
from llm_jax.model.device import compute_dtype
from llm_jax.model.kv_cache import CACHE_AXES, cache_dtype, cache_shapes
from llm_jax.model.kv_pages import page_shapes
from llm_jax.parallel.chips import GiB, Topology, abstract_devices, first_line, parse_topology
from llm_jax.parallel.sharding import Layout, abstract_params, make_layout, mesh_shape
from llm_jax.tools.hlo import hlo_stats, jaxpr_flops, memory_of
from llm_jax.train.objectives import objective_of
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

STEPS = ("train", "eval", "prefill", "decode", "paged_prefill", "paged_decode")


@dataclass
class Compiled:
    """One step compiled for one topology; every figure per device, per call of the step."""

    step: str
    compile_s: float
    memory: dict[str, int]  # arguments, outputs, aliased, temporaries, code, peak (bytes)
    flops: float  # matmul FLOPs, loops counted (the jaxpr's total / devices)
    xla_flops: float  # what XLA's cost_analysis reports (each loop body once)
    hbm_bytes: float
    collectives: dict[str, list[float]]  # kind -> [executions, bytes]
    roofline: dict[str, float]  # compute_s, memory_s, network_s, step_s
    bound: str  # which of the three the roofline step time is
    kernels: int  # Pallas kernels compiled by Mosaic in the step's HLO (calls of tpu_custom_call)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def roofline(topology: Topology, flops: float, hbm_bytes: float, link_bytes: float) -> tuple[dict[str, float], str]:
    chip = topology.chip
    times = {
        "compute_s": flops / chip.flops,
        "memory_s": hbm_bytes / chip.hbm_bw,
        "network_s": link_bytes / chip.link_bw,
    }
    bound = max(times, key=times.get)
    return times | {"step_s": times[bound]}, bound.removesuffix("_s")


def _compile(name: str, topology: Topology, layout: Layout, jitted, *args) -> Compiled:
    began = time.perf_counter()
    with layout.activate():
        try:
            traced = jitted.trace(*args)
            flops = jaxpr_flops(traced.jaxpr) / topology.devices
            compiled = traced.lower().compile()
        except UserError:
            raise
        except Exception as e:  # the tracer's or the compiler's own reason (a kernel's limits, a missing library)
            hint = (
                " (cuDNN attention traces only with its library: pip install 'llm_jax[cuda]', or model.attention=xla)"
            )
            raise UserError(
                f"{name} step for {topology.describe()}: cannot compile it: {first_line(e)}"
                + (hint if "cudnn" in str(e).lower() else "")
            ) from None
    seconds = time.perf_counter() - began
    text = compiled.as_text()
    stats = hlo_stats(text)
    xla = compiled.cost_analysis() or {}
    times, bound = roofline(topology, flops, stats.hbm_bytes, stats.collective_bytes)
    return Compiled(
        name,
        seconds,
        memory_of(compiled),
        flops,
        float(xla.get("flops", 0)),
        stats.hbm_bytes,
        stats.collectives,
        times,
        bound,
        text.count('custom_call_target="tpu_custom_call"'),
    )


def compile_config(
    cfg: Config, topology: Topology, steps=STEPS, serve_batch: int = 16, block: int = 16, chunk: int = 128
) -> list[Compiled]:
    """Each of `steps` compiled for the topology; a server's steps only for meshes without pipeline stages
    or a context axis
    (a server does not pipeline: its layer scan would run over weights split across stages). block and
    chunk: the paged steps' KV block size and prefill chunk (serve's --kv-block-size, --prefill-chunk)."""
    if cfg.mesh.dcn_data != topology.slices:
        raise UserError(
            f"{topology.describe()}: set mesh.dcn_data={topology.slices} (the data axis spans the slices), "
            f"not {cfg.mesh.dcn_data}"
        )
    if cfg.mesh.pipeline > 1 or cfg.mesh.context > 1:  # a server neither pipelines nor splits sequences
        steps = tuple(s for s in steps if s in ("train", "eval"))
    devices = abstract_devices(topology)
    layout = make_layout(cfg.mesh, devices)
    layout.check(cfg)
    objective = objective_of(cfg)
    if topology.chip.platform == "tpu":
        prebuild_splash(cfg.model)
    out = []
    if "train" in steps or "eval" in steps:
        built = make_steps(
            cfg, layout, make_optimizer(cfg.optim, cfg.train.steps), example=objective.example_row(cfg, "train")
        )
        if "train" in steps:
            out.append(_compile("train", topology, layout, built.jit_train, built.abstract_state, built.abstract_batch))
        if "eval" in steps:
            rows = cfg.train.batch_size // cfg.train.grad_accum
            batch = {
                k: jax.ShapeDtypeStruct(
                    (rows, *v.shape), v.dtype, sharding=layout.sharding(("batch",) + (None,) * v.ndim)
                )
                for k, v in objective.example_row(cfg, "val").items()
            }
            out.append(_compile("eval", topology, layout, built.jit_eval, built.abstract_state.params, batch))
    if {"prefill", "decode", "paged_prefill", "paged_decode"} & set(steps):
        out += _serving(cfg, topology, layout, steps, serve_batch, block, chunk)
    return out


def _serving(
    cfg: Config, topology: Topology, layout: Layout, steps, serve_batch: int, block: int, chunk: int
) -> list[Compiled]:
    """The serving steps at `serve_batch` rows (rounded up to the batch shards): over a contiguous cache
    (full-context prompts), then the paged ones (`_paged`)."""
    m = cfg.model
    shards = layout.axis_size("batch")
    b = -(-serve_batch // shards) * shards
    params = inference_params(m, abstract_params(m, layout), topology.chip.platform)  # as a server holds them
    rows = layout.sharding(("batch",))
    settings = tuple(jax.ShapeDtypeStruct((b,), d, sharding=rows) for d in (jnp.float32, jnp.int32, jnp.float32))
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
    seeds = jax.ShapeDtypeStruct((b,), jnp.uint32, sharding=rows)
    prefill, decode = serving_steps(m)
    out = []
    if "prefill" in steps:
        tokens = jax.ShapeDtypeStruct((b, m.seq_len), jnp.int32, sharding=layout.sharding(("batch", None)))
        out.append(_compile("prefill", topology, layout, jax.jit(prefill), params, tokens, lengths, seeds, settings))
    if "decode" in steps:
        dtype = compute_dtype(m.dtype, topology.chip.platform)
        cache = {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=layout.sharding(CACHE_AXES[name]))
            for name, shape in cache_shapes(m, b).items()
        }
        token = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated())
        jitted = jax.jit(decode, donate_argnums=1)
        out.append(_compile("decode", topology, layout, jitted, params, cache, token, lengths, seeds, step, settings))
    return out + _paged(m, topology, layout, steps, b, params, block, min(chunk, m.seq_len))


def _paged(m, topology: Topology, layout: Layout, steps, b: int, params, block: int, chunk: int) -> list[Compiled]:
    """Continuous batching's steps (inference/paged.py) as `serve` runs them by default: a pool of
    blocks for b full contexts, a prompt chunk of every row, one decode step."""
    width = m.seq_len // block
    with layout.activate():  # the pool's layout and dtype are the target's
        blocks = layout.axis_size("batch") * blocks_per_shard(b * width + 1, layout.axis_size("batch"))
        shapes, dtype = page_shapes(m, blocks, block), cache_dtype(m)
    pages = {name: jax.ShapeDtypeStruct(s, dtype, sharding=layout.sharding(a)) for name, (s, a) in shapes.items()}

    def rows(dtype, *shape):
        return jax.ShapeDtypeStruct((b, *shape), dtype, sharding=layout.sharding(("batch",) + (None,) * len(shape)))

    settings = tuple(rows(jnp.float32) for _ in range(3))
    prefill, decode, _ = paged_steps(m)
    out = []
    if "paged_prefill" in steps:
        jitted = jax.jit(prefill, static_argnums=PREFILL_STATIC, donate_argnums=1)
        ids = rows(jnp.int32, chunk)
        extra = (rows(jnp.uint32), ids, *settings)
        args = (params, pages, ids, ids, rows(jnp.int32, width), rows(jnp.int32), extra, False)
        out.append(_compile("paged_prefill", topology, layout, jitted, *args))
    if "paged_decode" in steps:
        jitted = jax.jit(decode, static_argnums=DECODE_STATIC, donate_argnums=1)
        one = rows(jnp.int32)
        args = (params, pages, one, one, rows(jnp.int32, width), one, rows(jnp.uint32), settings, 1, False)
        out.append(_compile("paged_decode", topology, layout, jitted, *args))
    return out


def versions(platform: str = "tpu") -> str:
    """jax and the compiler's package: libtpu, or jax's CUDA plugin."""
    package = "libtpu" if platform == "tpu" else "jax-cuda12-plugin"
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    return f"jax {jax.__version__}, {package} {version}"


def _gib(n: float) -> str:
    return "0" if n == 0 else f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _num(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_report(cfg: Config, topology: Topology, mesh: dict[str, int], reports: list[Compiled]) -> str:
    hbm = topology.chip.hbm
    mesh_text = " ".join(f"{k}={v}" for k, v in mesh.items())
    lines = [
        f"{topology.describe()} | mesh {mesh_text} | rules {cfg.mesh.rules} | batch {cfg.train.batch_size} x "
        f"{cfg.model.seq_len}, grad_accum {cfg.train.grad_accum} | compiled by XLA:{topology.chip.platform.upper()} "
        f"({versions(topology.chip.platform)})",
        f"{'per device':13} {'arguments':>10} {'outputs':>10} {'aliased':>10} {'temporary':>10} {'peak':>10} "
        f"{'of HBM':>11} | {'FLOPs':>10} {'(XLA count)':>12} | {'HBM bytes':>10} | {'collective':>10} | "
        "roofline (estimate)   | compile",
    ]
    for r in reports:
        mem = r.memory
        fits = "fits" if mem["peak"] <= hbm else "OVER"
        lines.append(
            f"{r.step:13} {_gib(mem['arguments']):>10} {_gib(mem['outputs']):>10} {_gib(mem['aliased']):>10} "
            f"{_gib(mem['temporaries']):>10} {_gib(mem['peak']):>10} {mem['peak'] / hbm:>6.0%} {fits} | "
            f"{_num(r.flops, 'FLOP'):>10} {_xla_count(r.xla_flops):>12} | {_num(r.hbm_bytes, 'B'):>10} | "
            f"{_num(sum(b for _, b in r.collectives.values()), 'B'):>10} | {_seconds(r.roofline['step_s']):>8} "
            f"{r.bound + '-bound':12} | {r.compile_s:5.1f} s"
        )
    lines.append("collectives per device and step (executions, bytes; loops counted):")
    for r in reports:
        used = [f"{k} {int(n)} x {_num(b, 'B')}" for k, (n, b) in r.collectives.items() if n]
        lines.append(f"  {r.step:13} " + (", ".join(used) or "none"))
    kernels = [f"{r.step} {r.kernels}" for r in reports if r.kernels]
    if kernels:
        lines.append("Pallas kernels (Mosaic) per step: " + ", ".join(kernels))
    c = topology.chip
    lines.append(
        f"roofline figures ({c.name}, vendor): {c.flops / 1e12:.0f} TFLOP/s bf16, HBM {c.hbm_bw / 1e9:.0f} GB/s, "
        f"links {c.link_bw / 1e9:.0f} GB/s per chip; step time = the longest of the three, perfect overlap assumed"
    )
    return "\n".join(lines)


def _xla_count(flops: float) -> str:
    return "(" + (_num(flops, "").strip() if flops else "n/a") + ")"  # XLA:GPU reports none


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def config_mesh(cfg: Config, topology: Topology) -> dict[str, int]:
    """The config's mesh resolved on the topology's devices; a mesh that cannot hold it is one UserError."""
    try:
        return dict(zip(MESH_AXES, mesh_shape(cfg.mesh, topology.devices)))
    except UserError as e:
        raise UserError(f"{topology.describe()}: {e}") from None


def main(args) -> None:
    cfg = load_config(args.config, args.overrides)
    topology = parse_topology(args.topology, args.slices)
    mesh = config_mesh(cfg, topology)
    steps = STEPS if args.steps == "all" else tuple(args.steps.split(","))
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise UserError(f"--steps {args.steps}: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)} or all")
    if args.serve_batch < 1:
        raise UserError(f"--serve-batch {args.serve_batch}: give at least 1 row")
    if args.kv_block_size < 1 or cfg.model.seq_len % args.kv_block_size or args.prefill_chunk < 16:
        raise UserError(
            f"need --kv-block-size dividing model.seq_len={cfg.model.seq_len} and --prefill-chunk >= 16 "
            f"(got {args.kv_block_size}, {args.prefill_chunk})"
        )
    reports = compile_config(cfg, topology, steps, args.serve_batch, args.kv_block_size, args.prefill_chunk)
    if args.json:
        record = {"config": args.config, "overrides": args.overrides, "topology": topology.name}
        record |= {"slices": topology.slices, "chips": topology.devices, "mesh": mesh}
        record["versions"] = versions(topology.chip.platform)
        print(json.dumps(record | {"steps": {r.step: r.as_dict() for r in reports}}))
    else:
        print(format_report(cfg, topology, mesh, reports))
        if cfg.mesh.pipeline > 1 and {"prefill", "decode"} & set(steps):
            print("prefill and decode not compiled: a server does not pipeline (compile them with mesh.pipeline=1)")
