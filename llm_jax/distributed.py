"""Joining a multi-process job: one process per host (TPU VM, GPU node), all running the same command.

Must run before any other JAX call. After it, jax.devices() lists every process's devices, the mesh
spans them, each process feeds its own rows of every batch (loader.train_iterator) and orbax writes
one checkpoint together.
"""

from __future__ import annotations

import os

import jax

from llm_jax.config import DistributedConfig
from llm_jax.errors import UserError


def _cluster_in_environment() -> str | None:
    """The multi-process launcher jax can read its coordinates from, if this looks like one."""
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1:
        return "SLURM"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU pod"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize(cfg: DistributedConfig) -> str | None:
    """Starts jax.distributed as the config or the environment says; returns a line saying how
    (None: a single process)."""
    if jax.distributed.is_initialized():
        return f"process {jax.process_index()} of {jax.process_count()}"
    if cfg.coordinator == "auto" or (cfg.coordinator is None and _cluster_in_environment()):
        how = _cluster_in_environment() or "auto-detected cluster"
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise UserError(f"could not join the {how} job: {e}; set distributed.coordinator, "
                            "distributed.num_processes and distributed.process_id explicitly") from None
    elif cfg.coordinator is not None:
        if cfg.num_processes is None or cfg.process_id is None:
            raise UserError("distributed.coordinator is set: also set distributed.num_processes and "
                            "distributed.process_id (this process's rank)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise UserError(f"distributed.process_id={cfg.process_id} must be in [0, {cfg.num_processes})")
        how = f"coordinator {cfg.coordinator}"
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    else:
        return None
    return f"process {jax.process_index()} of {jax.process_count()} ({how})"
