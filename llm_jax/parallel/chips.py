"""Accelerator chips and slice topologies: the vendor figures plan, compile and MFU use, and the
abstract TPU devices of a topology (libtpu's compiler, no TPU needed).

`v5p-256` names a slice the way Cloud TPU does (v4 and v5p count TensorCores, two per chip:
128 chips); `h100-8` is 8 GPUs. JAX names chips by `device_kind` (a v5p is "TPU v5"): the table
holds what JAX reports, read off libtpu 0.0.42's topologies, so MFU never falls back silently.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass

from llm_jax.errors import UserError
from llm_jax.parallel import gpu_target

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str  # the slice-name prefix: v5p, v5e, h100, ...
    device_kind: str  # what jax.Device.device_kind reports (GPUs: its prefix)
    hbm: int  # bytes of HBM per chip
    flops: float  # dense bf16 FLOP/s per chip
    hbm_bw: float  # HBM bytes/s per chip
    link_bw: float  # chip-to-chip bytes/s per chip, all links one way (TPU ICI, GPU NVLink)
    per_host: int  # chips that share a host (where tensor parallelism belongs)
    cores_per_chip: int  # v4 and v5p slice names count TensorCores, two per chip
    torus_dims: int  # 3: v4/v5p slices are AxBxC chips; 2: v5e/v6e are AxB; 0: GPUs (no TPU topology)

    @property
    def platform(self) -> str:  # as jax.Device.platform names it
        return "tpu" if self.torus_dims else "gpu"


# Vendor figures: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (ICI: the per-chip Gbps / 8) and the
# NVIDIA H100/H200/A100 SXM datasheets (NVLink: 900 and 600 GB/s both ways, halved).
_CHIP_LIST = (
    Chip("v4", "TPU v4", 32 * GiB, 275e12, 1228e9, 300e9, 4, 2, 3),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 600e9, 4, 2, 3),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 200e9, 8, 1, 2),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 448e9, 8, 1, 2),
    Chip("a100", "NVIDIA A100", 80 * GiB, 312e12, 2039e9, 300e9, 8, 1, 0),
    Chip("h100", "NVIDIA H100", 80 * GiB, 989e12, 3350e9, 450e9, 8, 1, 0),
    Chip("h200", "NVIDIA H200", 141 * GiB, 989e12, 4800e9, 450e9, 8, 1, 0),
    Chip("l4", "NVIDIA L4", 24 * GiB, 121e12, 300e9, 32e9, 8, 1, 0),
)
CHIPS = {c.name: c for c in _CHIP_LIST}


def chip_of_kind(device_kind: str) -> Chip | None:
    """The chip JAX calls `device_kind`: TPUs by exact name, NVIDIA GPUs by prefix ("NVIDIA H100 80GB HBM3")."""
    return next(
        (
            c
            for c in _CHIP_LIST
            if device_kind == c.device_kind or (not c.torus_dims and device_kind.startswith(c.device_kind))
        ),
        None,
    )


@dataclass(frozen=True)
class Topology:
    name: str  # as given: v5p-256
    chip: Chip
    chips: int  # per slice
    slices: int = 1

    @property
    def devices(self) -> int:
        return self.chips * self.slices

    @property
    def shape(self) -> tuple[int, ...]:
        """Chips along each torus dimension: v5p 128 -> (4, 4, 8), v5e 256 -> (16, 16), v5p 4 -> (2, 2, 1)."""
        k = int(math.log2(self.chips))
        n = self.chip.torus_dims
        exps = [k // n + (i >= n - k % n) for i in range(n)]  # as even as possible, larger last
        exps = [e for e in exps if e] + [0] * exps.count(0)  # Cloud TPU's own names: 2x2x1, not 1x2x2
        return tuple(2**e for e in exps)

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return f"{self.name}{slices}: {self.devices} {self.chip.name} chips"


def parse_topology(name: str, slices: int = 1) -> Topology:
    """'v5p-256' -> 128 v5p chips; 'v5e-64' / 'v5litepod-64' -> 64; 'h100-8' -> 8 GPUs."""
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
    chips = size // chip.cores_per_chip
    if chip.torus_dims and chips & (chips - 1):
        raise UserError(f"{name}: a {chip.name} slice holds a power of two of chips, not {chips}")
    if slices < 1:
        raise UserError(f"--slices {slices}: give at least one slice")
    return Topology(name, chip, chips, slices)


def first_line(e: Exception) -> str:
    """A library's error as one line (its first non-empty one, at most 300 characters)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def abstract_devices(topology: Topology) -> list:
    """The devices of a topology, for lowering and compiling only (no array may live on them): TPU
    chips from libtpu, NVIDIA GPUs from jax's CUDA plugin (parallel/gpu_target.py)."""
    if not topology.chip.torus_dims:
        return _abstract_gpus(topology)
    if not has_libtpu():
        raise UserError(
            "compiling for a TPU topology needs libtpu beside jax: pip install 'llm_jax[tpu]' "
            "(or make venv, whose dev extra has it)"
        )
    from jax.experimental import topologies

    shape = topology.shape + (1,) * (3 - len(topology.shape))
    host = (2, 2, 1) if topology.chips > 8 or topology.chip.torus_dims == 3 else shape  # v5e/v6e-8: one host
    host = tuple(min(h, s) for h, s in zip(host, shape))
    try:
        desc = topologies.get_topology_desc(
            topology_name=f"{topology.chip.name}:{'x'.join(map(str, topology.shape))}",
            platform="tpu",
            chip_config_name="megacore" if topology.chip.name == "v4" else "default",
            chips_per_host_bounds=host,
            num_slices=topology.slices,
        )
    except Exception as e:  # libtpu reports its own reason (a shape the chip does not come in, ...)
        raise UserError(f"{topology.describe()}: libtpu cannot lay it out: {first_line(e)}") from None
    return list(desc.devices)


def _abstract_gpus(topology: Topology) -> list:
    if topology.chip.name not in gpu_target.SPECS:
        raise UserError(
            f"{topology.name}: compiling knows {', '.join(gpu_target.SPECS)} GPUs; `llm-jax plan` estimates it"
        )
    if not gpu_target.has_cuda_plugin():
        raise UserError(
            f"compiling for {topology.name} needs jax's CUDA plugin: pip install 'llm_jax[cuda]' (no GPU is needed)"
        )
    if topology.devices > 8 and topology.devices % 8:
        raise UserError(f"{topology.name}: more than 8 GPUs come as whole hosts of 8")
    try:
        return gpu_target.abstract_gpus(topology.chip.name, topology.devices)
    except Exception as e:  # the plugin's own reason (JAX_PLATFORMS must leave cuda out without a GPU, ...)
        raise UserError(
            f"{topology.describe()}: the CUDA plugin cannot describe it: {str(e).splitlines()[0]}"
        ) from None
