"""Training telemetry: the progress line, metrics.jsonl, TensorBoard events, the loss-curve PNG,
and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax import run
from llm_jax.parallel.chips import chip_of_kind


def chip_peak_flops(device_kind: str) -> float | None:
    """The vendor's dense bf16 FLOP/s of one chip of the kind JAX reports (parallel/chips.py), or None."""
    chip = chip_of_kind(device_kind)
    return chip.flops if chip else None


@functools.cache
def measured_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on the default device: `dtype` inputs, float32 accumulation (best of runs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(dtype: str) -> float:
    """Peak FLOP/s of all devices together: vendor figures for known accelerators; on CPU (where
    simulated devices share the same cores) the measured matmul rate of the machine."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return max(measured_matmul_flops("float32"), measured_matmul_flops(dtype))
    chip = chip_peak_flops(device.device_kind)
    if chip is None:
        warnings.warn(
            f"no peak FLOP/s known for {device.device_kind!r}: MFU is against a measured matmul", stacklevel=2
        )
        chip = measured_matmul_flops(dtype)
    return chip * jax.device_count()


class Progress:
    """`step 120/1000 [###-------] 12% | loss 4.213 | lr 2.9e-04 | 1,234 tok/s | MFU 41.0% | ETA 12m03s`."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int, flops_per_token: float, peak: float):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak
        self.mark(start_step)

    def mark(self, step: int) -> None:
        """Restarts the rate clock (after compilation, evaluation or checkpointing)."""
        self._t, self._step = time.perf_counter(), step

    def rates(self, step: int) -> dict:
        dt = max(time.perf_counter() - self._t, 1e-9)
        steps = max(step - self._step, 1)
        tok_s = steps * self.tokens_per_step / dt
        return {"tokens_per_s": tok_s, "step_s": dt / steps, "mfu": tok_s * self.flops_per_token / self.peak}

    def line(self, step: int, metrics: dict, extra: str = "") -> str:
        """`extra`: what the objective adds (Objective.progress_extra)."""
        width, frac = 20, step / self.total
        bar = "#" * round(width * frac) + "-" * (width - round(width * frac))
        eta = (self.total - step) * metrics["step_s"]
        return (
            f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] {frac:4.0%} | loss {metrics['loss']:.4f} | "
            f"lr {metrics['lr']:.2e} | {metrics['tokens_per_s']:,.0f} tok/s | MFU {metrics['mfu']:.1%} | "
            f"ETA {_duration(eta)}{extra}"
        )


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard events under <run_dir>/tb, written by
    process 0 only (the metrics are global: every process holds the same values)."""

    def __init__(self, run_dir: Path, start_step: int):
        from tensorboardX import SummaryWriter  # heavy import; only runs that train need it

        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = run.metrics_path(run_dir)
        if self.path.exists():  # a resumed run rewrites the steps after its checkpoint
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.tb = SummaryWriter(str(run.tensorboard_dir(run_dir)), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def plot_losses(run_dir: Path) -> Path:
    """loss.png: train and validation loss against step, from metrics.jsonl."""
    import matplotlib  # 0.5 s to import, for the PNG only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in run.metrics_path(run_dir).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{split} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run.loss_plot_path(run_dir)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
