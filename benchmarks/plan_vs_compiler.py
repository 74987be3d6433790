"""`llm-jax plan`'s memory estimate against the TPU compiler's, per device, for the presets.

For each (config, topology): the mesh plan suggests, then that train step compiled by XLA:TPU
(libtpu, on this CPU machine) or XLA:GPU (jax's CUDA plugin, no GPU needed; skipped without it):
the train state (exact in plan) against the compiled arguments, plan's total against the compiled
peak, and the compile time. The README's memory table is this script's output.

    python benchmarks/plan_vs_compiler.py [--only llama-7b] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [
    ("llama-1b", "v5e-256"),
    ("llama-1b", "v5p-256"),
    ("llama-7b", "v5e-256"),
    ("llama-7b", "v5p-256"),
    ("llama-70b", "v5e-256"),
    ("llama-70b", "v5p-1024"),
    ("llama-1b", "h100-8"),  # compiled where jax's CUDA plugin is installed (llm_jax[cuda]), else estimated
    ("llama-7b", "h100-8"),
    ("llama-70b", "h100-64"),
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the cases of this config")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()

    import llm_jax  # noqa: F401  (quiets libtpu before JAX starts)
    from llm_jax.config import load_config
    from llm_jax.errors import UserError
    from llm_jax.parallel.chips import GiB, parse_topology
    from llm_jax.tools.compile import compile_config, versions
    from llm_jax.tools.plan import argument_bytes, plan_for, suggest

    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}, {versions()}")
    print("| config | topology | mesh (data x fsdp x tensor) | grad_accum | arguments GiB, plan / compiled | "
          "peak GiB, plan / compiled | plan off by | HBM | compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, topo_name in CASES:
        if args.only and name != args.only:
            continue
        cfg, topology = load_config(name), parse_topology(topo_name)
        best, accum = suggest(cfg, topology.chip, topology.devices)
        mesh = dataclasses.replace(cfg.mesh, **best.mesh, pipeline=1)
        trial = dataclasses.replace(cfg, mesh=mesh, train=dataclasses.replace(cfg.train, grad_accum=accum))
        plan = plan_for(trial, topology.chip, best.mesh)
        try:
            (report,) = compile_config(trial, topology, ("train",))
        except UserError as e:  # no compiler for this chip here
            print(f"| {name} | {topo_name} | {best.mesh} | {accum} | not compiled: {e} | {plan.total / GiB:.1f} / - |")
            continue
        mem = report.memory
        state = argument_bytes(trial, best.mesh, "tpu")
        row = {
            "config": name,
            "topology": topo_name,
            "mesh": best.mesh,
            "grad_accum": accum,
            "plan_state": state,
            "compiled_arguments": mem["arguments"],
            "plan_total": plan.total,
            "compiled_peak": mem["peak"],
            "compile_s": report.compile_s,
        }
        if args.json:
            print(json.dumps(row))
            continue
        m = best.mesh
        mesh_text = f"{m['data']} x {m['fsdp']} x {m['tensor']}"
        print(
            f"| {name} | {topo_name} ({topology.devices} chips) | {mesh_text} | {accum} | "
            f"{state / GiB:.2f} / {mem['arguments'] / GiB:.2f} | {plan.total / GiB:.1f} / {mem['peak'] / GiB:.1f} | "
            f"{plan.total / mem['peak'] - 1:+.0%} | {topology.chip.hbm / GiB:.0f} | {report.compile_s:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
