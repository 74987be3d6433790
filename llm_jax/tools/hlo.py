"""What a compiled step does per device, counted with its loops: FLOPs from the traced program,
HBM traffic and collectives from the compiled HLO.

XLA's `cost_analysis()` counts a while loop's body once: for a model whose layers are one scan it
reports about 1/n_layers of the step's FLOPs (llama-7b on v5p-256: 5.5e13 per chip where
8 N D says 1.8e15). So FLOPs are counted on the jaxpr instead (every dot_general, scan bodies
times their length, remat recomputation included as traced), and the HLO walk below multiplies
each loop body by the trip count it reads off the loop's condition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from jax.extend.core import jaxprs_in_params

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute", "send")
# "send": data handed to the data-center network between slices (multi-slice: XLA sends and receives
# through the megascale runtime instead of an ICI collective)


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr over the whole mesh: 2 x output size x contracted size per
    dot_general; scan bodies times their length, cond by its costliest branch, shard_map bodies
    (per device) times the devices they run on, Pallas kernels by their cost estimate or grid."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "pallas_call":  # its cost estimate, else its body once per grid point (an upper bound:
            estimate = getattr(params.get("cost_estimate"), "flops", None)  # blocks a mask skips are counted)
            grid = getattr(params.get("grid_mapping"), "grid", ())
            total += float(estimate) if estimate else math.prod(grid) * jaxpr_flops(params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in params["branches"])
        else:
            times = params.get("length", 1) if name == "scan" else 1
            if name == "shard_map":
                mesh = params["mesh"]
                manual = params.get("manual_axes") or params.get("newly_manual_axes") or mesh.axis_names
                times = math.prod(mesh.shape[a] for a in manual)
            for sub in jaxprs_in_params(params):
                total += times * jaxpr_flops(sub)
    return total


@dataclass
class HloStats:
    """Per device and per step, loops counted: HBM bytes read and written by the top-level ops (each
    fusion's operands and result), and the collectives by kind: [executions, bytes sent over links]."""

    hbm_bytes: float = 0.0
    collectives: dict[str, list[float]] = field(default_factory=lambda: {k: [0, 0.0] for k in COLLECTIVES})
    loops: list[int] = field(default_factory=list)  # trip counts found (0: one not read, counted once)

    @property
    def collective_bytes(self) -> float:
        """Over the chips' own links (ICI): every kind but the data-center network's sends."""
        return sum(b for k, (_, b) in self.collectives.items() if k != "send")


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_DTYPE_BYTES |= {"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c\d+|f8\w*)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT )?(%[\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_OPERANDS = re.compile(r"%[\w.\-]+")
_HEADER = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) \(")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_FREE |= {"opt-barrier", "while", "call", "conditional", "iota"}


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
    """Bytes of the arrays in an HLO shape; hbm_only leaves out those the compiler placed in on-chip
    memory (a layout with S(1), the TPU's VMEM)."""
    return sum(
        _DTYPE_BYTES.get(t, 1) * math.prod(int(d) for d in dims.split(",") if d)
        for t, dims, layout in _ARRAY.findall(shape)
        if not (hbm_only and "S(1)" in layout)
    )


def _operands(rest: str) -> list[str]:
    return _OPERANDS.findall(rest.split("), ")[0])


Instr = tuple[str, str, str, str, str]  # ("ROOT " or "", name, shape, op, the line after "op(")


def _computations(text: str) -> tuple[dict[str, list[Instr]], str]:
    """HLO text -> {computation: [instruction]}, and the entry's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = comps.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":  # (a Mosaic kernel's backend_config spans lines, some starting with "}")
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            current.append(m.groups())
    return comps, entry


def _trip_count(condition: list[Instr]) -> int:
    """A scan's loop condition compares its counter with a constant: `i < N` -> N (0 if not that form)."""
    constants = {
        n: int(v) for _, n, _, op, rest in condition if op == "constant" and (v := rest.split(")")[0]).isdigit()
    }
    for _, _, _, op, rest in condition:
        if op == "compare" and "direction=LT" in rest:
            for operand in _operands(rest):
                if operand in constants:
                    return constants[operand]
    return 0


@dataclass
class FusionIO:
    """What a fusion really moves, as XLA's cost model reads it: {operand index: bytes read} for
    operands read only through (dynamic-)slices (those slices) or updated in place (nothing), the
    bytes written when the root is an in-place dynamic-update-slice or scatter (its updates, else None), and
    the collectives inside (a collective fusion: kind, op, shape, operand bytes)."""

    reads: dict[int, float]
    written: float | None
    collectives: list[tuple[str, str, str, float]]


def _fusion_io(fused: list[Instr]) -> FusionIO:
    params, users, sizes, full, defs, root, collectives = {}, {}, {}, {}, {}, None, []
    for is_root, name, shape, op, rest in fused:
        sizes[name], full[name] = shape_bytes(shape, hbm_only=True), shape_bytes(shape)
        operands = _operands(rest)
        defs[name] = (op, operands)
        if op.removesuffix("-start") in COLLECTIVES:
            collectives.append((op.removesuffix("-start"), op, shape, sum(full.get(o, 0) for o in operands)))
        if op == "parameter":
            params[name] = int(rest.split(")")[0])
        for pos, operand in enumerate(operands):
            users.setdefault(operand, []).append((op, pos, name))
        if is_root:
            root = name

    def uses(name: str) -> list[tuple[str, int, str]]:  # through bitcasts, which move nothing
        out = []
        for op, pos, user in users.get(name, []):
            out += uses(user) if op == "bitcast" else [(op, pos, user)]
        return out

    reads = {}
    for name, index in params.items():
        found = uses(name)
        if found and all(op in ("dynamic-slice", "slice") and pos == 0 for op, pos, _ in found):
            reads[index] = sum(sizes[user] for _, _, user in found)
        elif found and all(op in IN_PLACE and pos < _buffers(op, defs[user][1]) for op, pos, user in found):
            reads[index] = 0.0
    while root in defs and defs[root][0] == "bitcast":
        root = defs[root][1][0]
    op, operands = defs.get(root, ("", []))
    return FusionIO(reads, _in_place_writes(op, operands, sizes), collectives)


IN_PLACE = ("dynamic-update-slice", "scatter")  # XLA updates operand 0 (scatter: its first n) in its buffer


def _buffers(op: str, operands: list[str]) -> int:
    """How many leading operands an in-place op updates: 1, or a scatter's n (its operands: n buffers,
    the indices, n updates)."""
    return (len(operands) - 1) // 2 if op == "scatter" else 1


def _in_place_writes(op: str, operands: list[str], sizes: dict) -> float | None:
    """Bytes an in-place op writes, its update(s); None for other ops (they write their whole result).
    Operands: a dynamic-update-slice's (buffer, update, start indices...), a scatter's (n buffers,
    indices, n updates)."""
    if op == "dynamic-update-slice":
        return sizes.get(operands[1], 0.0)
    if op == "scatter":
        return sum(sizes.get(o, 0.0) for o in operands[_buffers(op, operands) + 1 :])
    return None


def _link_bytes(kind: str, op: str, shape: str, operand_bytes: float) -> float:
    """Bytes one device sends for a collective (ring algorithms, (n - 1) / n taken as 1): an all-reduce
    its buffers twice (reduce-scatter then all-gather), a reduce-scatter its input, the others their
    result. An async `-start` op's shape lists its operands, then its results (then scalar contexts)."""
    arrays = [shape_bytes(f"{t}[{d}]") for t, d, _ in _ARRAY.findall(shape) if d]  # scalars: sync contexts
    if kind == "send":  # (data, context, token)
        return arrays[0] if arrays else 0.0
    if op.endswith("-start") and kind != "all-reduce" and len(arrays) > 1:
        arrays = arrays[len(arrays) // 2 :]
    if kind == "all-reduce":
        return 2 * sum(arrays)
    return operand_bytes if kind == "reduce-scatter" else sum(arrays)


def hlo_stats(text: str) -> HloStats:
    comps, entry = _computations(text)
    stats = HloStats()

    fusions: dict[str, FusionIO] = {}

    def count(kind: str, op: str, shape: str, operand_bytes: float, times: float) -> None:
        stats.collectives[kind][0] += times
        stats.collectives[kind][1] += times * _link_bytes(kind, op, shape, operand_bytes)

    def walk(comp: str, times: float) -> None:
        sizes, full = {}, {}
        for _, name, shape, op, rest in comps.get(comp, ()):
            sizes[name], full[name] = shape_bytes(shape, hbm_only=True), shape_bytes(shape)
            if op == "while":
                cond, body = (re.search(rf"{k}=(%[\w.\-]+)", rest).group(1) for k in ("condition", "body"))
                known = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)  # XLA:GPU annotates it
                trips = int(known.group(1)) if known else _trip_count(comps.get(cond, []))
                stats.loops.append(trips)
                walk(body, times * max(trips, 1))
            elif op in ("call", "conditional"):  # each branch counted: an upper bound
                called = re.findall(r"(?:to_apply|true_computation|false_computation)=(%[\w.\-]+)", rest)
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                for sub in called + (re.findall(r"%[\w.\-]+", branches.group(1)) if branches else []):
                    walk(sub, times)
            if op in _FREE or op.endswith("-done"):
                continue
            operands = _operands(rest)
            io = FusionIO({}, None, [])
            if op in IN_PLACE:  # unfused: reads the indices and updates, writes the updates in place
                io = FusionIO(
                    dict.fromkeys(range(_buffers(op, operands)), 0.0), _in_place_writes(op, operands, sizes), []
                )
            elif op in ("fusion", "async-start") and (called := re.search(r"calls=(%[\w.\-]+)", rest)):
                if called.group(1) not in fusions:
                    fusions[called.group(1)] = _fusion_io(comps.get(called.group(1), []))
                io = fusions[called.group(1)]
            moved = sum(io.reads.get(i, sizes.get(o, 0)) for i, o in enumerate(operands))
            stats.hbm_bytes += times * (moved + (sizes[name] if io.written is None else io.written))
            for collective in io.collectives:
                count(*collective, times)
            if op.removesuffix("-start") in COLLECTIVES:
                count(op.removesuffix("-start"), op, shape, sum(full.get(o, 0) for o in operands), times)

    if entry:
        walk(entry, 1.0)
    return stats


def memory_of(compiled) -> dict[str, int]:
    """Bytes per device from XLA's buffer assignment; peak = arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    out["peak"] = int(np.int64(out["arguments"]) + out["outputs"] - out["aliased"] + out["temporaries"])
    return out
