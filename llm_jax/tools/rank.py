"""`llm-jax plan --rank`: the layouts of a topology that the model divides, each train step
compiled for it (XLA:TPU; XLA:GPU with jax's CUDA plugin), those that do not fit dropped, the
rest ordered by the roofline step time (tools/compile.py). A table, rank.csv and rank.png, in
the shape of `llm-jax sweep`'s.

Candidates: pipeline 1, 2, 4, 8 (4 micro-batches per stage), tensor up to the chips of a host,
fsdp x data for the rest (data a multiple of the slices), all with the config's grad_accum doubled
until plan's estimate fits; --max-layouts of them are compiled (0: all), spread over the tensor x
pipeline choices. What the ranking can be trusted
for is in the README ("Mesh ranking"): the memory is the compiler's, the time is an estimate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llm_jax.config import Config, load_config
from llm_jax.errors import UserError
from llm_jax.parallel.chips import GiB, Topology, abstract_devices, parse_topology
from llm_jax.parallel.sharding import parse_meshes
from llm_jax.tools.compile import compile_config
from llm_jax.tools.plan import plan_for
from llm_jax.tools.sweep import write_outputs

COLUMNS = (
    "mesh",
    "grad_accum",
    "compile_s",
    "peak_bytes",
    "arg_bytes",
    "fits",
    "flops",
    "hbm_bytes",
    "link_bytes",
    "compute_ms",
    "memory_ms",
    "network_ms",
    "step_ms",
    "tokens_per_s",
    "bubble_theory",
    "error",
)
RANK_RULES = "fsdp_tp"  # data, fsdp, tensor and pipeline all used: every candidate is one preset


def _powers(n: int) -> list[int]:
    return [p for p in (2**i for i in range(n.bit_length())) if n % p == 0]


def candidates(cfg: Config, topology: Topology) -> list[Config]:
    """Every (data, fsdp, tensor, pipeline) of the topology that check_fit accepts, at the fewest
    micro-batches whose estimate fits; most data parallelism first, then least tensor, no pipeline."""
    n, out = topology.devices, []
    for pipeline in (p for p in (1, 2, 4, 8) if cfg.model.n_layers % p == 0 and n % p == 0):
        for tensor in (t for t in _powers(n // pipeline) if t <= topology.chip.per_host):
            for fsdp in _powers(n // pipeline // tensor):
                data = n // pipeline // tensor // fsdp
                if data % topology.slices:
                    continue
                mesh = dataclasses.replace(
                    cfg.mesh, data=data, fsdp=fsdp, tensor=tensor, pipeline=pipeline, context=1,
                    pipeline_repeats=1, microbatches=4 * pipeline if pipeline > 1 else 0,
                    dcn_data=topology.slices, rules=RANK_RULES,
                )  # fmt: skip
                fitted = _fewest_micro_batches(dataclasses.replace(cfg, mesh=mesh), topology)
                if fitted is not None:
                    out.append(fitted)
    return sorted(out, key=lambda c: (-c.mesh.data, c.mesh.pipeline, c.mesh.tensor, c.train.grad_accum))


def _fewest_micro_batches(cfg: Config, topology: Topology) -> Config | None:
    sizes = {"data": cfg.mesh.data, "pipeline": cfg.mesh.pipeline, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    accum = cfg.train.grad_accum
    while cfg.train.batch_size % accum == 0:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
        try:
            if plan_for(trial, topology.chip, sizes).fits:
                return trial
        except UserError:  # the model or the micro-batch does not divide over this mesh
            return None
        accum *= 2
    return None


def spread(layouts: list[Config], n: int) -> list[Config]:
    """At most n layouts (0: all) that cover the (tensor, pipeline) choices: each choice's most
    data-parallel layout first, then each one's next, and so on."""
    groups: dict[tuple[int, int], list[Config]] = {}
    for c in layouts:
        groups.setdefault((c.mesh.tensor, c.mesh.pipeline), []).append(c)
    rounds = [[g[i] for g in groups.values() if i < len(g)] for i in range(max(map(len, groups.values()), default=0))]
    out = [c for r in rounds for c in r]
    return out[:n] if n else out


def label(cfg: Config) -> str:
    m = cfg.mesh
    return f"{m.data}x{m.fsdp}x{m.tensor}" + (f" p{m.pipeline}m{m.pipeline_microbatches}" if m.pipeline > 1 else "")


def rank(cfg: Config, topology: Topology, layouts: list[Config], log=print) -> list[dict]:
    """Compiles each layout's train step; rows ordered: fitting ones by roofline step time, then the rest."""
    rows, tokens = [], cfg.train.batch_size * cfg.model.seq_len
    for trial in layouts:
        row = {"mesh": label(trial), "grad_accum": trial.train.grad_accum, "error": ""}
        row["bubble_theory"] = trial.mesh.pipeline_bubble
        try:
            (r,) = compile_config(trial, topology, ("train",))
        except UserError as e:
            rows.append(row | {"error": str(e).splitlines()[-1].strip(" -")})
            log(f"  {row['mesh']:>16}  skipped: {rows[-1]['error']}")
            continue
        t = r.roofline
        row |= {
            "compile_s": r.compile_s,
            "peak_bytes": r.memory["peak"],
            "arg_bytes": r.memory["arguments"],
            "fits": r.memory["peak"] <= topology.chip.hbm,
            "flops": r.flops,
            "hbm_bytes": r.hbm_bytes,
            "link_bytes": sum(b for _, b in r.collectives.values()),
            "compute_ms": 1e3 * t["compute_s"],
            "memory_ms": 1e3 * t["memory_s"],
            "network_ms": 1e3 * t["network_s"],
            "step_ms": 1e3 * t["step_s"],  # a pipeline's fill and drain ticks are in its FLOPs and bytes already
        }
        row["tokens_per_s"] = tokens / row["step_ms"] * 1e3
        rows.append(row)
        log(format_row(row))
    if not any(r.get("fits") for r in rows):
        raise UserError(f"no layout of {topology.describe()} fits the config's train step (compiled peak over HBM)")
    # ties (every layout compute-bound alike) go to the one that moves less over HBM and links
    return sorted(
        rows,
        key=lambda r: (
            not r.get("fits"),
            bool(r["error"]),
            r.get("step_ms", 0),
            r.get("memory_ms", 0) + r.get("network_ms", 0),
        ),
    )


HEADER = (
    f"  {'mesh':>16} {'accum':>5} {'compile':>8} {'peak GiB':>9} {'fits':>5} {'compute ms':>11} {'memory ms':>10} "
    f"{'network ms':>11} {'step ms':>9} {'bubble':>7}"
)


def format_row(r: dict) -> str:
    return (
        f"  {r['mesh']:>16} {r['grad_accum']:>5} {r['compile_s']:>7.0f}s {r['peak_bytes'] / GiB:>9.2f} "
        f"{'yes' if r['fits'] else 'NO':>5} {r['compute_ms']:>11.1f} {r['memory_ms']:>10.1f} {r['network_ms']:>11.1f} "
        f"{r['step_ms']:>9.1f} {r['bubble_theory']:>7.1%}"
    )


def main(args) -> None:
    cfg = load_config(args.config, args.overrides)
    topology = parse_topology(args.topology, args.slices)
    if args.max_layouts < 0:
        raise UserError(f"--max-layouts {args.max_layouts}: give 0 (all) or more")
    abstract_devices(topology)  # no compiler for it here: say so once, not once per layout
    layouts = candidates(cfg, topology)
    if args.meshes:
        wanted = {(d, f, t, p) for d, f, t, p, *_ in parse_meshes(args.meshes)}
        layouts = [c for c in layouts if (c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.pipeline) in wanted]
    if not layouts:
        raise UserError(f"no layout of {topology.describe()} divides the model with its batch (see llm-jax plan)")
    chosen = spread(layouts, args.max_layouts)
    print(
        f"rank: {len(layouts)} layouts of {topology.describe()} divide the model and fit by estimate; compiling "
        f"{len(chosen)} (--max-layouts {args.max_layouts}: each tensor x pipeline choice's most data-parallel "
        f"first), train step only, rules {RANK_RULES}\n{HEADER}",
        flush=True,
    )
    rows = rank(cfg, topology, chosen)
    print("ranked (fitting layouts by estimated step time; the time is a roofline, the memory XLA's):\n" + HEADER)
    for i, r in enumerate(rows, 1):
        print(format_row(r).replace("  ", f"{i:>2}", 1) if not r["error"] else f"{i:>2} {r['mesh']:>16}  {r['error']}")
    out = Path(args.out or Path(cfg.run_dir) / "rank").expanduser()
    csv_path, png_path = write_outputs(
        [r | {"batch_size": cfg.train.batch_size} for r in rows if not r["error"]], out, "rank",
        COLUMNS, "throughput (roofline estimate)",
    )  # fmt: skip
    print(f"-> {csv_path}, {png_path}")
