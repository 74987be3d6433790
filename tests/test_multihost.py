"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train exactly like
one process with 8 devices, checkpoint together, resume together, and each reads only its rows."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.config import load_config
from llm_jax.data.loader import train_iterator
from llm_jax.errors import UserError
from llm_jax.parallel.distributed import initialize
from llm_jax.run import load_run
from llm_jax.train.loop import train
from llm_jax.train.objectives import prepare_data

pytestmark = pytest.mark.slow  # every test here starts processes or compiles several steps

WORKER = Path(__file__).with_name("multihost_worker.py")
# data spans the two processes (one "slice" each, over DCN); fsdp stays inside a process.
MESH = [
    "mesh.data=2",
    "mesh.fsdp=4",
    "mesh.tensor=1",
    "mesh.rules=fsdp",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=4",
    "sample.max_new_tokens=4",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(run: Path, tmp: Path, *overrides: str) -> list[dict]:
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, str(i), str(run), str(tmp / f"p{i}.json"), *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp / f"p{i}.json").read_text()) for i in range(2)]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _params(run: Path):
    return load_run(run).params


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_template, corpus_slice):
    """One process, 8 devices, same mesh shape, 6 steps uninterrupted."""
    run = tmp_path_factory.mktemp("ref") / "run"
    shutil.copytree(prepared_template, run)
    cfg = tiny_config(run, *MESH, "mesh.dcn_data=1", "train.steps=6", sources=corpus_slice)
    train(cfg, log=lambda *_: None)
    return run, cfg


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path, prepared_template, corpus_slice, reference):
    ref_run, ref_cfg = reference
    run = tmp_path / "run"
    shutil.copytree(prepared_template, run)
    sources = f"data.sources=[{','.join(corpus_slice)}]"
    common = [sources, *MESH, "mesh.dcn_data=2"]

    first = _two_processes(run, tmp_path, *common, "train.steps=4")  # checkpoint at 4, written by both
    assert [r["process"] for r in first] == [0, 1] and {r["devices"] for r in first} == {8}
    assert {r["local_devices"] for r in first} == {4}
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    _two_processes(run, tmp_path, *common, "train.steps=6")  # resumes from 4 in both processes

    want, got = _losses(ref_run), _losses(run)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=0, atol=1e-5)
    params, ref_params = _params(run), _params(ref_run)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)

    # Each process read its own half of the global batch: disjoint rows that make up the 1-process batch.
    data = prepare_data(ref_cfg, ref_run, log=lambda *_: None)
    whole = next(train_iterator(data.train, ref_cfg.train.batch_size, ref_cfg.seed))["tokens"]
    halves = [np.asarray(r["first_rows"]) for r in first]
    assert all(h.shape == (whole.shape[0] // 2, whole.shape[1]) for h in halves)
    np.testing.assert_array_equal(halves[0], whole[0::2])
    np.testing.assert_array_equal(halves[1], whole[1::2])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distributed.coordinator=127.0.0.1:1234"], "also set distributed.num_processes and distributed.process_id"),
        (
            ["distributed.coordinator=127.0.0.1:1234", "distributed.num_processes=2", "distributed.process_id=2"],
            r"distributed.process_id=2 must be in \[0, 2\)",
        ),
    ],
)
def test_an_explicit_coordinator_needs_a_valid_rank(overrides, message):
    with pytest.raises(UserError, match=message):
        initialize(load_config("tiny", overrides).distributed)


def _launch(run: Path, tmp: Path, coordinator: str, *overrides: str, env1: dict | None = None):
    import os

    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, str(i), str(run), str(tmp / f"p{i}.json"), *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env1 or {})} if i == 1 else None,
        )
        for i in range(2)
    ]


def test_a_sigterm_on_one_host_makes_every_host_save_the_same_step(tmp_path, prepared_template, corpus_slice):
    """The hosts join with distributed.coordinator and ranks given; the resumed job without distributed.*
    keys, found by JAX's own cluster detection (a SLURM step's environment), as on a Cloud TPU VM slice."""
    import signal
    import time

    run = tmp_path / "run"
    shutil.copytree(prepared_template, run)
    common = [f"data.sources=[{','.join(corpus_slice)}]", *MESH, "mesh.dcn_data=2", "train.checkpoint_every=100000"]
    procs = _launch(run, tmp_path, f"127.0.0.1:{_free_port()}", *common, "train.steps=100000")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
    stopped = [int(o.split("stopped by SIGTERM at step ")[1].split(":")[0]) for o in outs]
    assert stopped[0] == stopped[1] and [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == [
        str(stopped[0])
    ]
    assert "topology: 2 processes x 4 cpu devices" in outs[1] and "feeds global batch rows 1::2" in outs[1]
    assert "(Slurm job, found by jax)" not in outs[1]
    again = _launch(run, tmp_path, f"slurm:{_free_port()}", *common, f"train.steps={stopped[0] + 2}")
    outs = [p.communicate(timeout=300)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0], [o[-2000:] for o in outs]
    assert all(f"(step {stopped[0]})" in o for o in outs)
    assert "(Slurm job, found by jax)" in outs[1] and "topology: 2 processes x 4 cpu devices" in outs[1]


def test_hosts_running_different_code_stop_at_start(tmp_path, prepared_template):
    import os

    alt = tmp_path / "alt"
    for part in ("llm_jax", "configs"):  # the package finds configs/ beside it
        shutil.copytree(Path(__file__).parent.parent / part, alt / part, ignore=shutil.ignore_patterns("__pycache__"))
    with open(alt / "llm_jax" / "config" / "rules.py", "a") as f:  # outside parallel/, the digest's own
        f.write("# an older checkout\n")
    run = tmp_path / "run"
    shutil.copytree(prepared_template, run)
    procs = _launch(
        run,
        tmp_path,
        f"127.0.0.1:{_free_port()}",
        *MESH,
        "distributed.timeout_s=60",
        env1={"PYTHONPATH": f"{alt}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert all("processes [1] run different llm_jax code from process 0" in o for o in outs)


def test_an_unreachable_coordinator_is_named(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"  # nobody listens: process 1 waits for a process 0 that never comes
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_jax",
            "train",
            "--config",
            "tiny",
            f"run_dir={tmp_path / 'r'}",
            f"distributed.coordinator={coordinator}",
            "distributed.num_processes=2",
            "distributed.process_id=1",
            "distributed.timeout_s=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"error: process 1 could not reach the coordinator {coordinator} within distributed.timeout_s=3 s "
        "(Connection refused)" in out.stderr
    )
