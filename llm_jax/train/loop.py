"""A training run end to end, for every objective (pretrain, sft, dpo): run directory -> data ->
mesh -> (resumed) state -> steps, evals, checkpoints -> loss curve and samples. Rerunning the same
command resumes; SIGTERM/SIGINT save. What differs between objectives comes from their registry
entry (llm_jax/train/objectives.py)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from llm_jax import run
from llm_jax.config import Config, to_dict
from llm_jax.data.loader import PreparedData, eval_batches, train_iterator
from llm_jax.inference.generate import Generator, fit_prompt, stream_text
from llm_jax.model.device import auto_dtype, compute_dtype
from llm_jax.model.transformer import count_params, flops_per_token
from llm_jax.parallel.sharding import make_layout
from llm_jax.train.metrics import MetricsWriter, Progress, peak_flops, plot_losses
from llm_jax.train.objectives import objective_of
from llm_jax.train.optimizer import lr_schedule, make_optimizer
from llm_jax.train.step import Steps, make_steps


def train(cfg: Config, devices: list | None = None, log=print) -> dict:
    """Trains cfg.train.steps steps (resuming from the newest checkpoint); returns the final val metrics."""
    objective = objective_of(cfg)
    run_dir, data = prepare_run_data(cfg, log)

    layout = make_layout(cfg.mesh, devices)
    layout.check(cfg)
    data = objective.before_training(cfg, layout, data, log)
    example = data.train[0]
    steps = make_steps(
        cfg,
        layout,
        make_optimizer(cfg.optim, cfg.train.steps),
        data.tokenizer.token_bytes(cfg.model.vocab_size),
        example,
    )
    it = train_iterator(
        data.train, cfg.train.batch_size, cfg.seed, jax.process_index(), jax.process_count(), cfg.data.loader_workers
    )
    ckpt = run.Checkpointer(cfg)

    start = ckpt.latest_step()
    if start is None:
        start, state = 0, steps.init(jax.random.PRNGKey(cfg.seed))
        if cfg.train.init_from:
            params, _ = run.newest_params(
                cfg.train.init_from, steps.abstract_state.params, f"train.init_from={cfg.train.init_from}"
            )
            params = steps.to_stage_order(params)
            ref = jax.tree_util.tree_map(lambda x: x.copy(), params) if state.ref_params is not None else None
            state = state.replace(params=params, ref_params=ref)
            log(f"initialised from {cfg.train.init_from} (fresh optimizer and schedule)")
    else:
        state = steps.to_stage_order(ckpt.restore(start, steps.abstract_state, it)[0])
        log(f"resumed from {ckpt.directory / str(start)} (step {start})")
    n, i = jax.process_count(), jax.process_index()
    device = jax.local_devices()[0]
    log(
        f"topology: {n} process{'es' if n > 1 else ''} x {jax.local_device_count()} {device.platform} devices "
        f"({device.device_kind}); process {i} on {socket.gethostname()} feeds global batch rows {i}::{n} "
        f"({cfg.train.batch_size // n} of {cfg.train.batch_size} per step)"
    )
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "{} (model.dtype=auto: {})".format(*auto_dtype())
    log(
        f"model: {count_params(state.params):,} parameters, computing in {dtype} | "
        f"mesh {dict(layout.mesh.shape)}, rules {cfg.mesh.rules}, "
        f"on {jax.device_count()} {jax.devices()[0].platform} devices | "
        f"objective {cfg.train.objective}, {cfg.train.batch_size} x {example['tokens'].shape} tokens per step"
    )

    writer = MetricsWriter(run_dir, start)
    meta = {"config": to_dict(cfg)}
    final = {}
    try:
        if start < cfg.train.steps:
            state, final = _loop(cfg, steps, state, it, data, ckpt, writer, meta, start, example, log)
        else:
            log(f"run already complete at step {start} (train.steps={cfg.train.steps}); raise train.steps to continue")
    finally:
        ckpt.close()
        writer.close()
    if jax.process_index() == 0 and run.metrics_path(run_dir).stat().st_size:
        log(f"loss curve -> {plot_losses(run_dir)}")
    print_samples(cfg, steps.to_layer_order(state.params), data.tokenizer, run_dir, log)
    return final


def prepare_run_data(cfg: Config, log=print) -> tuple[Path, PreparedData]:
    """The run directory (checked against the config it was made with) and its data, built once:
    process 0 builds it; the others then read it (shared file system) or, finding none, build the
    identical, seeded copy on their own disk."""
    objective = objective_of(cfg)
    run_dir = run.run_path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.check_resumable(cfg, run_dir, objective.pinned)
    if jax.process_index() == 0:
        data = objective.prepare(cfg, run_dir, log)
        run.save_run_config(cfg, run_dir)  # after the data exists: it records what the data was built from
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llm_jax: data prepared")
    if jax.process_index() != 0:
        data = objective.prepare(cfg, run_dir, log=lambda *_: None)
    return run_dir, data


def _loop(
    cfg: Config,
    steps: Steps,
    state,
    it,
    data: PreparedData,
    ckpt: run.Checkpointer,
    writer: MetricsWriter,
    meta: dict,
    start: int,
    example: dict,
    log,
) -> tuple:
    t, objective = cfg.train, objective_of(cfg)
    schedule = lr_schedule(cfg.optim, t.steps)
    rows = example["tokens"].reshape(-1, example["tokens"].shape[-1])  # (a DPO example is 2 sequences)
    progress = Progress(
        t.steps,
        start,
        t.batch_size * rows.shape[0] * (rows.shape[1] - 1),
        flops_per_token(cfg.model),
        peak_flops(compute_dtype(cfg.model.dtype).name),
    )
    final = {}
    began = time.perf_counter()
    with _StopSignals() as stop:
        for step in range(start + 1, t.steps + 1):
            batch = steps.layout.put_batch(next(it))
            state, metrics = steps.train(state, batch)
            if step == start + 1:
                jax.block_until_ready(metrics)
                progress.mark(step)  # rates exclude compilation
            if step % t.log_every == 0 or step == t.steps:
                row = {k: float(v) for k, v in metrics.items()} | {"lr": float(schedule(step - 1))}
                row |= progress.rates(step)
                if hasattr(it, "shares"):  # data.mixture: each part's share of the rows so far
                    row |= {f"share/{name}": share for name, share in it.shares().items()}
                writer.write(step, "train", row)
                log(progress.line(step, row, objective.progress_extra(row)))
                progress.mark(step)
            if step % t.eval_every == 0 or step == t.steps:
                final = evaluate(cfg, steps, state.params, data)
                writer.write(step, "val", final)
                log(objective.val_line(final))
                progress.mark(step)
            stopping = stop.due(step)
            if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                saved = steps.to_layer_order(state)  # checkpoints keep the layers in order (model/pipeline.py)
                ckpt.save(step, saved, it, meta)
                state = steps.to_stage_order(saved)
                progress.mark(step)
            if stopping:
                ckpt.close()
                log(
                    f"stopped by {signal.Signals(stop.signum).name} at step {step}: checkpoint saved in "
                    f"{ckpt.directory / str(step)}; run the same command to resume"
                )
                raise SystemExit(128 + stop.signum)
    log(
        f"trained steps {start + 1}-{t.steps} in {(time.perf_counter() - began) / 60:.1f} min "
        f"(compilation, evaluation and checkpoints included)"
    )
    return state, final


def evaluate(cfg: Config, steps: Steps, params, data: PreparedData) -> dict:
    """The objective's metrics over the first train.eval_batches validation batches (pretrain, sft:
    loss, perplexity and bits per byte; dpo: loss, reward accuracy and margin, rewards and log-probs,
    means over held-out pairs)."""
    micro, metrics = cfg.train.batch_size // cfg.train.grad_accum, objective_of(cfg).eval_metrics

    def sums_over(source) -> dict:
        sums = {}
        for batch in eval_batches(source, micro, cfg.train.eval_batches, jax.process_index(), jax.process_count()):
            out = steps.eval(params, steps.layout.put_batch(batch))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        return sums

    final = metrics(sums_over(data.val))
    for name, source in (data.val_parts or {}).items():  # data.mixture: each part's own figures too
        final |= {f"{k}/{name}": v for k, v in metrics(sums_over(source)).items() if k in ("loss", "bpb")}
    return final


def print_samples(cfg: Config, params, tokenizer, run_dir: Path, log) -> None:
    """Samples one continuation per sample.prompts entry (sft/dpo: one reply to it as a user turn);
    printed and saved to samples.txt."""
    s, objective = cfg.sample, objective_of(cfg)
    generator = Generator(cfg.model, params)
    texts = []
    for i, prompt in enumerate(s.prompts):
        ids, stop = objective.sample(tokenizer, prompt, s.system)
        ids, max_new, note = fit_prompt(ids, cfg.model.seq_len, s.max_new_tokens)
        if note:
            log(f"note: {note}")
        tokens = generator.stream(ids, max_new, s.temperature, s.top_k, s.top_p, seed=cfg.seed + i, stop_ids=stop)
        texts.append(objective.show_sample(prompt, "".join(stream_text(tokenizer, tokens))))
    if jax.process_index() == 0:
        out = "".join(f"--- sample {i + 1} ---\n{text}\n" for i, text in enumerate(texts))
        run.samples_path(run_dir).write_text(out)
        log(out.rstrip())


class _StopSignals:
    """SIGTERM / SIGINT ask the loop to checkpoint after the current step and exit; a second one
    interrupts at once (the previous checkpoint stays intact: saves are atomic).

    In a multi-process job every process must save the same step, though a preempted TPU VM's
    SIGTERM reaches one host at a time: SIGTERM is then left to JAX's preemption notifier (set up by
    jax.distributed.initialize), and at every step `due` asks multihost_utils.reached_preemption_sync_point,
    which turns true on every process at the same step once any of them was notified."""

    def __init__(self):
        self.signum = 0
        self.multi = jax.process_count() > 1
        self._previous = {}

    def due(self, step: int) -> bool:
        if self.multi and not self.signum and multihost_utils.reached_preemption_sync_point(step):
            self.signum = signal.SIGTERM
        return bool(self.signum)

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
            "(send it again to stop at once)",
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
