"""llm_jax installs like a library: a wheel built from the checkout, installed into a fresh virtual
environment, finds its configs and trains from a directory outside the checkout."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes or compiles several steps

CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (not the editable checkout). Its dependencies come from the
    test's own environment through a path entry, so nothing is downloaded; that entry carries no
    .pth hooks, so the checkout's editable install stays out of sight."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(
        CHECKOUT,
        tmp / "source",
        ignore=shutil.ignore_patterns(  # the build writes here
            ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp,
    )
    wheel = next((tmp / "dist").glob("llm_jax-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    return env_dir


def _run(env_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run(
        [str(env_dir / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_wheel_ships_the_configs_and_is_what_runs(installed, tmp_path):
    out = _run(
        installed,
        tmp_path,
        "python",
        "-c",
        "import llm_jax, llm_jax.config as c; print(llm_jax.__file__); print(c.CONFIG_DIR)",
    )
    assert out.returncode == 0, out.stderr
    package, config_dir = out.stdout.split()
    assert str(installed) in package and not package.startswith(str(CHECKOUT))
    assert Path(config_dir) == Path(package).parent / "configs"
    assert {"base.yaml", "tiny.yaml", "shakespeare.yaml"} <= {p.name for p in Path(config_dir).iterdir()}

    out = _run(installed, tmp_path, "llm-jax", "config", "--config", "tiny", "model.n_layers=3")
    assert out.returncode == 0, out.stderr
    assert "n_layers: 3" in out.stdout and "run_dir: runs/tiny" in out.stdout


def test_the_installed_command_trains_a_tiny_run_outside_the_checkout(installed, tmp_path, corpus_slice):
    out = _run(
        installed,
        tmp_path,
        "llm-jax",
        "train",
        "--config",
        "tiny",
        "run_dir=runs/mine",
        f"data.sources=[{','.join(corpus_slice)}]",
        "train.steps=4",
        "train.eval_every=4",
        "train.log_every=2",
        "sample.max_new_tokens=4",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "mine"
    assert (run / "checkpoints" / "4").is_dir() and (run / "samples.txt").read_text().startswith("--- sample 1 ---")
    assert "val | loss" in out.stdout
