"""The device a step is traced for, which picks kernels and chunk sizes, and what its compiler needs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def target_device():
    """The active mesh's device kind (abstract TPU chips under `llm-jax compile`, so a step compiled
    here for a TPU gets the TPU's kernels), else the default device. Has .platform and .device_kind."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device or jax.devices()[0]


def on_cpu() -> bool:
    return target_device().platform == "cpu"


def to_bits(x: jax.Array) -> jax.Array:
    """bfloat16 -> uint16 of the same bits (other dtypes pass). XLA:CPU computes bfloat16 only in
    matmuls: a bfloat16 array that a loop slices (the LM head's tiles, a scan's saved activations) is
    converted to float32 and back around every slice; its bits pass through untouched (measured on the
    benchmark step: 50-100 ms of converts less)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def from_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def saved(x: jax.Array, name: str) -> jax.Array:
    """x, named for the remat policies of model/transformer.py; on CPU what is saved are its bits."""
    if not on_cpu():
        return checkpoint_name(x, name)
    return from_bits(checkpoint_name(to_bits(x), name))


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide matmul speed here


def cpu_info() -> dict:
    """{"model", "cores", "flags"} of this machine's CPU (Linux /proc/cpuinfo; elsewhere what platform
    knows), flags limited to CPU_FLAGS."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags]}
