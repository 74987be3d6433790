"""Abstract NVIDIA GPUs for compiling without one: XLA:GPU's target description of a GPU model
(jax.experimental.topologies with platform "cuda" and a GpuTargetConfig), built from the figures
below (NVIDIA's datasheets and CUDA occupancy tables). Needs jax's CUDA plugin (llm_jax[cuda]);
no GPU, driver or CUDA library is touched when JAX_PLATFORMS=cpu (the compile command sets it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str  # what jax reports as device_kind
    compute_capability: tuple[int, int]
    sms: int  # streaming multiprocessors ("cores" to XLA)
    fp32_per_sm: int
    shared_per_sm: int  # bytes of shared memory per SM, and the most one block may opt into
    shared_optin: int
    l2: int  # bytes
    clock_ghz: float  # boost clock
    memory: int  # bytes of device memory
    bandwidth: float  # bytes/s


SPECS = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 40 << 20, 1.41, 80 << 30, 2039e9),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 50 << 20, 1.98, 80 << 30, 3352e9),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 128, 233472, 232448, 50 << 20, 1.98, 141 << 30, 4800e9),
}


def has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def target_config(spec: GpuSpec) -> str:
    """The GpuTargetConfig text proto XLA:GPU compiles for (the limits every CUDA GPU since sm_70 shares)."""
    major, minor = spec.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 << 10,
        "shared_memory_per_core": spec.shared_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": spec.sms,
        "fpus_per_core": spec.fp32_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(spec.bandwidth),
        "l2_cache_size": spec.l2,
        "clock_rate_ghz": spec.clock_ghz,
        "device_memory_size": spec.memory,
        "shared_memory_per_block_optin": spec.shared_optin,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (
        f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 patch: 1 }}\n'
        f'device_description_str: "{spec.name}"\n'
    )


def abstract_gpus(chip_name: str, count: int) -> list:
    """`count` GPUs of this model, 8 per host (fewer: one host), for lowering and compiling only."""
    from jax.experimental import topologies

    per_host = min(count, 8)
    desc = topologies.get_topology_desc(
        topology_name=chip_name,
        platform="cuda",
        target_config=target_config(SPECS[chip_name]),
        topology=f"1x{count // per_host}x{per_host}",
    )
    return list(desc.devices)
