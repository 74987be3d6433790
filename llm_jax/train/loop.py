"""Pretraining end to end: run directory -> data -> mesh -> (resumed) state -> steps, evals,
checkpoints -> loss curve and samples. Rerunning the same command resumes; SIGTERM/SIGINT save."""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
import yaml

from llm_jax import sharding
from llm_jax.config import Config, save_config, to_dict
from llm_jax.chat import prompt_ids
from llm_jax.data.chat_data import ExampleRows, save_array
from llm_jax.data.loader import eval_batches, train_iterator
from llm_jax.data.prepare import PreparedData, prepare_data
from llm_jax.errors import UserError
from llm_jax.generate import Generator, fit_prompt, stream_text
from llm_jax.model.transformer import count_params, flops_per_token
from llm_jax.train.checkpoint import (Checkpointer, checkpoint_dir, latest_checkpoint, restore_params,
                                     saved_checkpoint_dir)
from llm_jax.train.metrics import MetricsWriter, Progress, peak_flops, plot_losses
from llm_jax.train.optimizer import lr_schedule, make_optimizer
from llm_jax.train.step import Steps, abstract_params, eval_metrics, make_steps, pair_scorer

# Keys a run directory pins: its packed data was built from the first group, its checkpoints
# (model shapes, data order) from both.
_DATA_KEYS = ("seed", "model.vocab_size", "data.sources", "data.text_field", "data.val_fraction", "data.tokenizer",
              "data.tokenizer_sample_bytes", "data.val_sources", "data.bad_rows", "data.shard_mb", "curate.",
              "train.objective", "train.init_from")
_CHECKPOINT_KEYS = _DATA_KEYS + ("model.", "train.batch_size", "dpo.reference")


def train(cfg: Config, devices: list | None = None, log=print) -> dict:
    """Trains cfg.train.steps steps (resuming from the newest checkpoint); returns the final val metrics."""
    run_dir, data = prepare_run_data(cfg, log)

    layout = sharding.make_layout(cfg.mesh, devices)
    layout.check(cfg)
    if cfg.train.objective == "dpo":
        data = reference_logps(cfg, layout, data, run_dir, log)
    example = data.train[0]
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, cfg.train.steps),
                       data.tokenizer.token_bytes(cfg.model.vocab_size), example)
    it = train_iterator(data.train, cfg.train.batch_size, cfg.seed, jax.process_index(), jax.process_count(),
                        cfg.data.loader_workers)
    ckpt = Checkpointer(checkpoint_dir(run_dir, cfg.train.checkpoint_dir), cfg.train.keep_checkpoints)

    start = ckpt.latest_step()
    if start is None:
        start, state = 0, steps.init(jax.random.PRNGKey(cfg.seed))
        if cfg.train.init_from:
            params = initial_params(cfg, steps.abstract_state.params)
            ref = jax.tree_util.tree_map(lambda x: x.copy(), params) if state.ref_params is not None else None
            state = state.replace(params=params, ref_params=ref)
            log(f"initialised from {cfg.train.init_from} (fresh optimizer and schedule)")
    else:
        state, _ = ckpt.restore(start, steps.abstract_state, it)
        log(f"resumed from {ckpt.directory / str(start)} (step {start})")
    n, i = jax.process_count(), jax.process_index()
    device = jax.local_devices()[0]
    log(f"topology: {n} process{'es' if n > 1 else ''} x {jax.local_device_count()} {device.platform} devices "
        f"({device.device_kind}); process {i} on {socket.gethostname()} feeds global batch rows {i}::{n} "
        f"({cfg.train.batch_size // n} of {cfg.train.batch_size} per step)")
    log(f"model: {count_params(state.params):,} parameters | mesh {dict(layout.mesh.shape)}, rules {cfg.mesh.rules}, "
        f"on {jax.device_count()} {jax.devices()[0].platform} devices | "
        f"objective {cfg.train.objective}, {cfg.train.batch_size} x {example['tokens'].shape} tokens per step")

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
    if jax.process_index() == 0 and (run_dir / "metrics.jsonl").stat().st_size:
        log(f"loss curve -> {plot_losses(run_dir)}")
    print_samples(cfg, state.params, data.tokenizer, run_dir, log)
    return final


def prepare_run_data(cfg: Config, log=print) -> tuple[Path, PreparedData]:
    """The run directory (checked against the config it was made with) and its data, built once:
    process 0 builds it; the others then read it (shared file system) or, finding none, build the
    identical, seeded copy on their own disk."""
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(cfg, run_dir)
    if jax.process_index() == 0:
        data = prepare_data(cfg, run_dir, log)
        save_config(cfg, run_dir / "config.yaml")  # after the data exists: it records what the data was built from
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llm_jax: data prepared")
    if jax.process_index() != 0:
        data = prepare_data(cfg, run_dir, log=lambda *_: None)
    return run_dir, data


def _loop(cfg: Config, steps: Steps, state, it, data: PreparedData, ckpt: Checkpointer, writer: MetricsWriter,
          meta: dict, start: int, example: dict, log) -> tuple:
    t = cfg.train
    schedule = lr_schedule(cfg.optim, t.steps)
    rows = example["tokens"].reshape(-1, example["tokens"].shape[-1])  # (a DPO example is 2 sequences)
    progress = Progress(t.steps, start, t.batch_size * rows.shape[0] * (rows.shape[1] - 1),
                        flops_per_token(cfg.model), peak_flops(cfg.model.dtype))
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
                writer.write(step, "train", row)
                log(progress.line(step, row))
                progress.mark(step)
            if step % t.eval_every == 0 or step == t.steps:
                final = evaluate(cfg, steps, state.params, data)
                writer.write(step, "val", final)
                log(val_line(final))
                progress.mark(step)
            stopping = stop.due(step)
            if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                ckpt.save(step, state, it, meta)
                progress.mark(step)
            if stopping:
                ckpt.close()
                log(f"stopped by {signal.Signals(stop.signum).name} at step {step}: checkpoint saved in "
                    f"{ckpt.directory / str(step)}; run the same command to resume")
                raise SystemExit(128 + stop.signum)
    log(f"trained steps {start + 1}-{t.steps} in {(time.perf_counter() - began) / 60:.1f} min "
        f"(compilation, evaluation and checkpoints included)")
    return state, final


def evaluate(cfg: Config, steps: Steps, params, data: PreparedData) -> dict:
    """Over the first train.eval_batches validation batches: loss, perplexity and bits per byte;
    dpo: loss, reward accuracy and margin, rewards and log-probs (means over held-out pairs)."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    sums = {}
    for batch in eval_batches(data.val, micro, cfg.train.eval_batches, jax.process_index(), jax.process_count()):
        out = steps.eval(params, steps.layout.put_batch(batch))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
    return eval_metrics(sums)


def val_line(m: dict) -> str:
    if "reward_accuracy" in m:
        return (f"  val | loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.3f} | "
                f"margin {m['reward_margin']:.3f} | rewards chosen {m['chosen_reward']:.3f} "
                f"rejected {m['rejected_reward']:.3f}")
    return f"  val | loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | bpb {m['bpb']:.4f}"


def initial_params(cfg: Config, abstract):
    """The parameters of train.init_from's newest checkpoint, placed as `abstract` says."""
    directory = saved_checkpoint_dir(cfg.train.init_from)
    step_dir = latest_checkpoint(directory)
    if step_dir is None:
        raise UserError(f"train.init_from={cfg.train.init_from}: no checkpoint in {directory}; train that run first")
    return restore_params(step_dir, abstract)


def reference_logps(cfg: Config, layout: sharding.Layout, data: PreparedData, run_dir: Path, log) -> PreparedData:
    """dpo: the starting model's sequence log-probs [N, 2] of every pair, saved beside the data as
    <split>.ref_logps.npy (computed once; the val split always, the train split unless
    dpo.reference=in_step) and from then on part of each example."""
    data_dir = run_dir / "data"
    splits = ("train", "val") if cfg.dpo.reference == "precomputed" else ("val",)
    missing = [s for s in splits if not (data_dir / f"{s}.ref_logps.npy").is_file()]
    if missing:
        params = initial_params(cfg, abstract_params(cfg.model, layout))
        score = pair_scorer(cfg.model, layout)
        micro, pi, pc = cfg.train.batch_size // cfg.train.grad_accum, jax.process_index(), jax.process_count()
        began = time.perf_counter()
        for split in missing:
            source = getattr(data, split)
            out = np.zeros((len(source), 2), np.float32)
            for start, batch in zip(range(0, len(source), micro), eval_batches(source, micro, len(source), pi, pc)):
                with layout.activate():
                    logps = np.asarray(score(params, layout.put_batch(batch)))
                # global row j is host j // per_host's (j % per_host)-th row: source row start + host + k * hosts
                index = [start + j // (micro // pc) + (j % (micro // pc)) * pc for j in range(micro)]
                keep = [j for j, i in enumerate(index) if i < len(source)]
                out[[index[j] for j in keep]] = logps[keep]
            save_array(data_dir / f"{split}.ref_logps.npy", out)
        log(f"reference log-probs of {', '.join(missing)} pairs from {cfg.train.init_from} "
            f"in {time.perf_counter() - began:.0f} s -> {data_dir}/<split>.ref_logps.npy")
    return dataclasses.replace(data, train=ExampleRows(data_dir, "train"), val=ExampleRows(data_dir, "val"))


def print_samples(cfg: Config, params, tokenizer, run_dir: Path, log) -> None:
    """Samples one continuation per sample.prompts entry (sft/dpo: one reply to it as a user turn);
    printed and saved to samples.txt."""
    s = cfg.sample
    generator = Generator(cfg.model, params)
    chat = cfg.train.objective != "pretrain"
    texts = []
    for i, prompt in enumerate(s.prompts):
        if chat:
            ids, stop = prompt_ids(tokenizer, [{"role": "user", "content": prompt}], s.system)
        else:
            ids, stop = [tokenizer.eos_id] + tokenizer.encode(prompt), (tokenizer.eos_id,)
        ids, max_new, note = fit_prompt(ids, cfg.model.seq_len, s.max_new_tokens)
        if note:
            log(f"note: {note}")
        tokens = generator.stream(ids, max_new, s.temperature, s.top_k, s.top_p, seed=cfg.seed + i, stop_ids=stop)
        reply = "".join(stream_text(tokenizer, tokens))
        texts.append(f"user: {prompt}\nassistant: {reply}" if chat else prompt + reply)
    if jax.process_index() == 0:
        out = "".join(f"--- sample {i + 1} ---\n{text}\n" for i, text in enumerate(texts))
        (run_dir / "samples.txt").write_text(out)
        log(out.rstrip())


def _check_resumable(cfg: Config, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    frozen = _CHECKPOINT_KEYS if latest_checkpoint(checkpoint_dir(run_dir, cfg.train.checkpoint_dir)) else _DATA_KEYS
    saved, current = _flatten(yaml.safe_load(saved_path.read_text()) or {}), _flatten(to_dict(cfg))
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
               if k.startswith(frozen) and k in saved and saved[k] != current[k]]
    if changed:
        raise UserError(f"{run_dir} holds a run with a different config:\n  " + "\n  ".join(changed)
                        + f"\nresume with the original values, or start a new run with run_dir=<new dir> "
                          f"(or delete {run_dir})")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


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
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(send it again to stop at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
