"""Joining a multi-process job: one process per host (TPU VM, GPU node), all running the same command.

Must run before any other JAX call. After it, jax.devices() lists every process's devices, the mesh
spans them, each process feeds its own rows of every batch (loader.train_iterator) and orbax writes
one checkpoint together. Every process then checks that all run the same llm_jax code (a digest of
its source files): workers left on an older checkout fail at once instead of diverging silently.
"""

from __future__ import annotations

import hashlib
import socket
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax.config import DistributedConfig
from llm_jax.errors import UserError


def detected_cluster() -> str | None:
    """The multi-process job JAX's own detection finds, as `jax.distributed.initialize()` without
    arguments would join it: SLURM, Open MPI, a Cloud TPU VM slice (workers from the GCE metadata
    server, as `tpu_setup/create.sh` makes them), a GKE TPU pod (TPU_WORKER_HOSTNAMES), Kubernetes.
    Its name, or None where there is none or it holds one process."""
    try:
        from jax._src.clusters import ClusterEnv  # the registry jax.distributed.initialize() reads
    except ImportError:  # a jax that moved it: joining stays explicit (distributed.coordinator)
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            with warnings.catch_warnings():  # a pod without the kubernetes package: jax warns at every start
                warnings.simplefilter("ignore")
                if env.is_env_present() and env.get_process_count() > 1:
                    return env.__name__.removesuffix("Cluster")
        except Exception:  # a probe that cannot read its source (metadata server, scheduler) finds nothing
            continue
    return None


def initialize(cfg: DistributedConfig) -> str | None:
    """Starts jax.distributed as the config or the environment says; returns a line saying how
    (None: a single process)."""
    if jax.distributed.is_initialized():
        return f"process {jax.process_index()} of {jax.process_count()}"
    cluster = detected_cluster() if cfg.coordinator in (None, "auto") else None
    if cfg.coordinator == "auto" or cluster:
        how = f"{cluster} job, found by jax" if cluster else "auto-detected cluster"
        try:
            jax.distributed.initialize(initialization_timeout=cfg.timeout_s)
        except Exception as e:  # jax's runtime error type varies across versions
            raise UserError(
                f"could not join the {how} job: {e}; set distributed.coordinator, "
                "distributed.num_processes and distributed.process_id explicitly"
            ) from None
    elif cfg.coordinator is not None:
        if cfg.num_processes is None or cfg.process_id is None:
            raise UserError(
                "distributed.coordinator is set: also set distributed.num_processes and "
                "distributed.process_id (this process's rank)"
            )
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise UserError(f"distributed.process_id={cfg.process_id} must be in [0, {cfg.num_processes})")
        how = f"coordinator {cfg.coordinator}"
        if cfg.process_id != 0:
            _wait_for_coordinator(cfg)
        print(
            f"process {cfg.process_id}: joining {cfg.num_processes} processes at {cfg.coordinator} (waiting up to "
            f"distributed.timeout_s={cfg.timeout_s} s for all of them)",
            flush=True,
        )
        jax.distributed.initialize(
            cfg.coordinator, cfg.num_processes, cfg.process_id, initialization_timeout=cfg.timeout_s
        )
    else:
        return None
    check_same_code()
    return f"process {jax.process_index()} of {jax.process_count()} ({how}) on {socket.gethostname()}"


def _wait_for_coordinator(cfg: DistributedConfig) -> None:
    """Until timeout_s, try to open a TCP connection to the coordinator: when jax cannot reach it, it
    aborts the process with a C++ stack trace, so an unreachable address is reported here instead."""
    host, _, port = cfg.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"distributed.coordinator={cfg.coordinator!r} must be host:port, e.g. 10.0.0.2:1234")
    deadline, error = time.monotonic() + cfg.timeout_s, None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            error = e.strerror or str(e)
            time.sleep(0.5)
    raise UserError(
        f"process {cfg.process_id} could not reach the coordinator {cfg.coordinator} within "
        f"distributed.timeout_s={cfg.timeout_s} s ({error}): check the address and port, that process 0 "
        "runs, and the firewall"
    )


def code_digest() -> bytes:
    """sha256 of the llm_jax package's source files (names and contents), 16 bytes."""
    root = Path(__file__).resolve().parents[1]  # the llm_jax package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.digest()[:16]


def check_same_code() -> None:
    """All processes run the same llm_jax source, or every one of them stops naming the odd ones."""
    mine = np.frombuffer(code_digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    odd = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if odd:
        raise UserError(
            f"processes {odd} run different llm_jax code from process 0 (source digests differ): "
            "install the same checkout on every host (tpu_setup/install.sh does) and relaunch"
        )
