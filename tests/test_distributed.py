"""Which multi-process job a process joins: JAX's own cluster detection, read through its registry."""

from __future__ import annotations

import pytest

from llm_jax.parallel.distributed import detected_cluster

SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_a_slurm_step_of_several_tasks_is_detected(monkeypatch):
    for key, value in {**SLURM_STEP, "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    assert detected_cluster() == "Slurm"


@pytest.mark.parametrize("tasks", ["1", None])
def test_one_task_or_no_launcher_is_no_job(monkeypatch, tasks):
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(key, raising=False)
    if tasks:
        for key, value in {**SLURM_STEP, "SLURM_NTASKS": tasks}.items():
            monkeypatch.setenv(key, value)
    assert detected_cluster() is None  # (and on this CPU machine no Cloud TPU metadata server answers)


def test_a_kubernetes_pod_without_the_kubernetes_package_runs_one_process_quietly(monkeypatch, recwarn):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert detected_cluster() is None
    assert not [w for w in recwarn if "kubernetes" in str(w.message).lower()]
