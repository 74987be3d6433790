"""The command line's compilation cache (llm_jax/cli.py): each command run twice against an empty cache
folder, the first run compiling and filling it, the second loading from it. Times are wall-clock for the
whole process: `serve` until it prints its address, `generate` and a 30-step tiny `train.py` to the end.

    python benchmarks/compile_cache.py [--run runs/shakespeare]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cache: Path, until: str | None = None) -> float:
    """Seconds until the process ends (or prints a line containing `until`, then it is stopped)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"LLM_JAX_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if until and until in line:
            break
    seconds = time.perf_counter() - t0
    proc.terminate()
    if proc.wait(120) not in (0, -15):
        sys.exit(f"failed: {' '.join(cmd)}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/shakespeare", help="a trained run (make demo makes runs/shakespeare)")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "llm_jax"]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "own.txt"
        text.write_text((ROOT / "README.md").read_text() + (ROOT / "LICENSE").read_text())
        commands = {
            f"serve --run {args.run}": ([*cli, "serve", "--run", args.run, "--port", "0"], "serving"),
            f"generate --run {args.run}, 50 tokens": (
                [*cli, "generate", "--run", args.run, "--prompt", "ROMEO:", "--max-new-tokens", "50"],
                None,
            ),
            "train.py --config tiny, 30 steps": (
                [sys.executable, "train.py", "--config", "tiny", "train.steps=30", f"data.sources=[{text}]"],
                None,
            ),
        }  # fmt: skip
        from small_corpus import machine

        print(machine())
        print("| command | first run (compiles) | second run (cached) | ratio |")
        print("|---|---:|---:|---:|")
        for k, (name, (cmd, until)) in enumerate(commands.items()):
            cache = Path(tmp) / f"cache{k}"
            runs = [[f"run_dir={tmp}/run{k}{i}"] if "train.py" in name else [] for i in (0, 1)]  # a fresh run each
            first, second = (timed(cmd + extra, cache, until) for extra in runs)
            print(f"| {name} | {first:.1f} s | {second:.1f} s | {first / second:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
