"""The device a step is traced for, which picks kernels and chunk sizes, and what its compiler needs."""

from __future__ import annotations

import functools

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


def transposed(x: jax.Array) -> jax.Array:
    """x [M, K] -> x^T [K, M] for a matmul operand. On CPU in bfloat16 the transpose goes through a 3-D
    view, [M, K/g, g] -> [K/g, g, M] -> [K, M]: XLA folds a plain 2-D transpose back into the matmul
    that reads it, giving one that contracts the leading axes of both operands, which its bfloat16
    kernels run at half speed (or failed: 'Unsupported element type for DotThunk::Execute: BF16 x BF16
    = F32', jax 0.10.2); through the view it stays a copy (0.3 ms for 2048 x 1024) and the matmul reads
    [K, M] as it lies: d w of the MLP's down projection, [1024, 2048] x [2048, 384], 4.8 ms against
    11.8 with the leading axes contracted and 16.9 for the identity matmul this replaced (AMD Zen 4,
    2 cores, jax 0.10.2)."""
    m, k = x.shape
    group = next((g for g in (8, 4, 2) if k % g == 0), None)
    if not (on_cpu() and x.dtype == jnp.bfloat16 and group):
        return x.T
    return x.reshape(m, k // group, group).transpose(1, 2, 0).reshape(k, m)


def cpu_rows(x: jax.Array) -> jax.Array:
    """x [1, K] -> [2, K] (a zero row below) for a bfloat16 matmul on CPU; other shapes, dtypes and
    platforms: x. XLA:CPU runs a one-row bfloat16 dot as a float32 matrix-vector product after
    converting the whole weight to float32 (the demo's LM head, 1 x 256 by 16384 x 256 on 2 Xeon cores:
    1.1 ms) where two rows take its bfloat16 kernels (0.5 ms); a prompt's last position and batch-1
    decoding meet it at every step. The caller keeps the first row of the product."""
    if x.ndim == 2 and x.shape[0] == 1 and x.dtype == jnp.bfloat16 and on_cpu():
        return jnp.pad(x, ((0, 1), (0, 0)))
    return x


def saved(x: jax.Array, name: str) -> jax.Array:
    """x, named for the remat policies of model/block.py; on CPU what is saved are its bits."""
    if not on_cpu():
        return checkpoint_name(x, name)
    return from_bits(checkpoint_name(to_bits(x), name))


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide matmul speed here


@functools.cache
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


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
    """model.dtype as a dtype: `auto` resolved for `platform` (default: the platform traced for)."""
    return jnp.dtype(name if name != "auto" else auto_dtype(platform)[0])


def auto_dtype(platform: str | None = None, cpu_flags: list[str] | None = None) -> tuple[str, str]:
    """(dtype, why) of model.dtype=auto on `platform` (default: the one traced for): bfloat16 on TPUs
    and GPUs, and on CPUs with bf16 matrix units (Intel AMX: amx_bf16) or bf16 dot-product instructions
    (avx512_bf16: AMD Zen 4, Intel Cooper Lake; default flags: this CPU's); float32 on other CPUs (AMD
    Zen 3: AVX2 only), where XLA's bfloat16 matmuls convert to float32 and run slower. Zen 4, 2 cores,
    2026-12-07: a 2048^2 matmul at 391 GFLOP/s with bf16 inputs against 210 in float32, the demo's
    train step 593 against 829 ms (benchmarks/train_throughput.py, small_corpus.py)."""
    platform = platform or target_device().platform
    if platform != "cpu":
        return "bfloat16", f"{platform}: bf16 matrix units"
    flags = cpu_info()["flags"] if cpu_flags is None else cpu_flags
    if "amx_bf16" in flags:
        return "bfloat16", "CPU with AMX bf16 matrix units"
    if "avx512_bf16" in flags:
        return "bfloat16", "CPU with AVX-512 bf16 dot products (avx512_bf16)"
    return "float32", "CPU without bf16 matrix units or dot products (no amx_bf16, avx512_bf16)"
