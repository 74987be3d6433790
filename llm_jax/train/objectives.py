"""The training objectives, one registry entry each: everything that differs between pretraining,
SFT and DPO lives here, and nothing else in llm_jax branches on train.objective.

An entry says how its data is prepared (and, for DPO, completed before training), what the train
step sums (llm_jax/train/losses.py) and the eval step sums, how those sums become metrics and
metric lines, and how a sample prompt is rendered. Adding an objective is adding an entry to
OBJECTIVES (CONTRIBUTING.md walks through it).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import run
from llm_jax.config import Config, ModelConfig
from llm_jax.data.chat_data import ExampleRows, prepare_chat, save_array
from llm_jax.data.chat_template import prompt_ids
from llm_jax.data.dataset import use_dataset
from llm_jax.data.loader import PreparedData, eval_batches
from llm_jax.data.prepare import prepare_text
from llm_jax.data.progress import progress
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import Layout, abstract_params
from llm_jax.train import losses

Sums = Callable  # (params, batch, rng=None, ref_params=None) -> (loss sum [], {metric: sum []})


class Objective(abc.ABC):
    """The interface, with the defaults most objectives share: nothing pinned, no extra checks, no
    step before training, no frozen reference in the train state."""

    pinned: tuple[str, ...] = ()  # config keys a checkpoint of this objective pins (beyond run.CHECKPOINT_KEYS)

    def problems(self, cfg: Config) -> list[str]:
        return []

    @abc.abstractmethod
    def prepare(self, cfg: Config, run_dir: Path, log) -> PreparedData: ...

    def before_training(self, cfg: Config, layout: Layout, data: PreparedData, log) -> PreparedData:
        return data

    def in_step_reference(self, cfg: Config) -> bool:
        return False

    @abc.abstractmethod
    def example_row(self, cfg: Config, split: str) -> dict[str, np.ndarray]:
        """Zeros shaped like one row of the prepared `split` (train | val) data: what a step is compiled for
        without the data (`llm-jax compile`)."""
        ...

    @abc.abstractmethod
    def train_sums(self, cfg: Config, train_model: Transformer, eval_model: Transformer) -> tuple[Sums, Callable]:
        """(sums, count): count(batch) is the divisor of the loss and metric sums."""
        ...

    @abc.abstractmethod
    def eval_sums(self, cfg: Config, model: Transformer, bytes_table: jax.Array) -> Callable:
        """(params, batch) -> {name: sum over the batch}; eval_metrics turns the totals into metrics."""
        ...

    @abc.abstractmethod
    def eval_metrics(self, sums: dict) -> dict: ...

    @abc.abstractmethod
    def val_line(self, metrics: dict) -> str: ...

    def progress_extra(self, metrics: dict) -> str:
        """What the progress line adds to loss, lr, tokens/s and MFU (a mixture: each part's share of the rows so
        far; an MoE model: its router's state)."""
        shares = ", ".join(f"{k.removeprefix('share/')} {v:.0%}" for k, v in metrics.items() if k.startswith("share/"))
        mixture = f" | mix {shares}" if shares else ""
        if "moe_aux" not in metrics:
            return mixture
        dropped = f", dropped {metrics['moe_dropped']:.1%}" if metrics["moe_dropped"] else ""
        return f"{mixture} | balance {metrics['moe_aux']:.3f}, load cv {metrics['moe_load_cv']:.2f}{dropped}"

    @abc.abstractmethod
    def sample(self, tokenizer: Tokenizer, prompt: str, system: str | None) -> tuple[list[int], tuple[int, ...]]:
        """A sample.prompts entry -> (prompt ids, ids that end the sample)."""
        ...

    @abc.abstractmethod
    def show_sample(self, prompt: str, reply: str) -> str: ...


class _LanguageModel(Objective):
    """The weighted next-token loss: every target (pretrain) or the assistant tokens (sft)."""

    def train_sums(self, cfg, train_model, eval_model):
        def sums(params, batch, rng=None, ref_params=None):
            return losses.lm_sums(train_model, params, batch, rng, cfg.optim.z_loss)

        return sums, losses.lm_count

    def eval_sums(self, cfg, model, bytes_table):
        def eval_sums(params, batch):
            """Weighted nll (nats), target tokens and the UTF-8 bytes they stand for."""
            w = batch["weights"]
            return {
                "nll": losses.lm_sums(model, params, batch)[0],
                "tokens": jnp.sum(w),
                "bytes": jnp.sum(bytes_table[batch["tokens"][:, 1:]] * w),
            }

        return eval_sums

    def eval_metrics(self, sums):
        loss = sums["nll"] / sums["tokens"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": sums["nll"] / math.log(2) / sums["bytes"]}

    def val_line(self, m):
        parts = "".join(f" | {k.removeprefix('bpb/')} bpb {v:.4f}" for k, v in m.items() if k.startswith("bpb/"))
        return f"  val | loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | bpb {m['bpb']:.4f}{parts}"


class Pretrain(_LanguageModel):
    def example_row(self, cfg, split):
        tokens = np.zeros(cfg.model.seq_len + 1, np.int32)  # a packed window and its document ids
        row = {"tokens": tokens, "segments": tokens}
        return row | ({"weights": np.ones(cfg.model.seq_len, np.float32)} if split == "val" else {})

    def prepare(self, cfg, run_dir, log):
        if cfg.data.prepared:  # a dataset built once by `llm-jax data prepare --out` (llm_jax/data/dataset.py)
            return use_dataset(cfg, run_dir, log)
        return prepare_text(cfg, run.data_dir(run_dir), run.tokenizer_path(run_dir), log)

    def sample(self, tokenizer, prompt, system):
        return [tokenizer.bos_id] + tokenizer.encode(prompt), (tokenizer.eos_id,)

    def show_sample(self, prompt, reply):
        return prompt + reply


class _ChatSamples:
    """Fine-tuned models are sampled through the chat template: each prompt is one user turn."""

    def sample(self, tokenizer, prompt, system):
        return prompt_ids(tokenizer, [{"role": "user", "content": prompt}], system)

    def show_sample(self, prompt, reply):
        return f"user: {prompt}\nassistant: {reply}"


def _chat_data(cfg: Config, run_dir: Path, log, kind: str) -> PreparedData:
    """sft / dpo examples, with the tokenizer of the run the parameters come from."""
    if cfg.train.init_from:
        source = run.tokenizer_path(cfg.train.init_from)
    elif cfg.data.tokenizer:
        source = Path(cfg.data.tokenizer).expanduser()
    else:
        raise UserError(
            f"train.objective={kind} needs a tokenizer: set train.init_from to a pretrained run "
            "directory (or data.tokenizer to its tokenizer.model)"
        )
    return prepare_chat(cfg, kind, run.data_dir(run_dir), source, run.tokenizer_path(run_dir), log)


class SFT(_ChatSamples, _LanguageModel):
    def example_row(self, cfg, split):
        tokens = np.zeros(cfg.model.seq_len + 1, np.int32)
        return {"tokens": tokens, "segments": tokens, "weights": np.zeros(cfg.model.seq_len, np.float32)}

    def prepare(self, cfg, run_dir, log):
        return _chat_data(cfg, run_dir, log, "sft")


class DPO(_ChatSamples, Objective):
    """Preference pairs against the frozen starting model (train.init_from), llm_jax/train/losses.py."""

    pinned = ("dpo.reference",)

    def problems(self, cfg):
        return (
            []
            if cfg.train.init_from
            else [
                "train.objective=dpo needs train.init_from: the run whose model is the policy's start and the reference"
            ]
        )

    def prepare(self, cfg, run_dir, log):
        return _chat_data(cfg, run_dir, log, "dpo")

    def before_training(self, cfg, layout, data, log):
        return reference_logps(cfg, layout, data, log)

    def in_step_reference(self, cfg):
        return cfg.dpo.reference == "in_step"

    def example_row(self, cfg, split):
        row = {"tokens": np.zeros((2, cfg.model.seq_len + 1), np.int32)}
        row["weights"] = np.zeros((2, cfg.model.seq_len), np.float32)
        scored = split == "val" or not self.in_step_reference(cfg)
        return row | ({"ref_logps": np.zeros(2, np.float32)} if scored else {})

    def train_sums(self, cfg, train_model, eval_model):
        def sums(params, batch, rng=None, ref_params=None):
            return losses.dpo_sums(train_model, eval_model, cfg.dpo, params, batch, rng, ref_params)

        return sums, lambda batch: jnp.sum(losses.pair_mask(batch))

    def eval_sums(self, cfg, model, bytes_table):
        def eval_sums(params, batch):
            """The loss and metrics summed over the real pairs, and their number."""
            loss, aux = losses.dpo_sums(model, model, cfg.dpo, params, batch)
            return {"loss": loss, "pairs": jnp.sum(losses.pair_mask(batch))} | aux

        return eval_sums

    def eval_metrics(self, sums):
        return {k: v / sums["pairs"] for k, v in sums.items() if k != "pairs"}

    def val_line(self, m):
        return (
            f"  val | loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.3f} | "
            f"margin {m['reward_margin']:.3f} | rewards chosen {m['chosen_reward']:.3f} "
            f"rejected {m['rejected_reward']:.3f}"
        )

    def progress_extra(self, m):
        return super().progress_extra(m) + f" | reward acc {m['reward_accuracy']:.2f}, margin {m['reward_margin']:.3f}"


OBJECTIVES: dict[str, Objective] = {"pretrain": Pretrain(), "sft": SFT(), "dpo": DPO()}


def objective_of(cfg: Config) -> Objective:
    """cfg's objective, checked: an unknown name or a config it cannot train with is a UserError."""
    entry = OBJECTIVES.get(cfg.train.objective)
    problems = (
        [f"train.objective={cfg.train.objective!r} must be one of {', '.join(OBJECTIVES)}"]
        if entry is None
        else entry.problems(cfg)
    )
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
    return entry


def prepare_data(cfg: Config, run_dir: str | Path, log=print) -> PreparedData:
    """The objective's data for a run directory: built once, then read."""
    return objective_of(cfg).prepare(cfg, run.run_path(run_dir), log)


def pair_scorer(cfg: ModelConfig, layout: Layout) -> Callable:
    """(params, {tokens [B, 2, L+1], weights [B, 2, L]}) -> summed response log-probs [B, 2], on
    every device: the reference scores of DPO pairs. Call under layout.activate()."""
    model = Transformer(cfg)
    return jax.jit(
        lambda p, b: losses.sequence_logps(model, p, b["tokens"], b["weights"]), out_shardings=layout.replicated()
    )


def reference_logps(cfg: Config, layout: Layout, data: PreparedData, log) -> PreparedData:
    """dpo: the starting model's sequence log-probs [N, 2] of every pair, saved beside the data as
    <split>.ref_logps.npy (computed once; the val split always, the train split unless
    dpo.reference=in_step) and from then on part of each example."""
    directory = run.data_dir(cfg.run_dir)
    splits = ("train", "val") if cfg.dpo.reference == "precomputed" else ("val",)
    missing = [s for s in splits if not (directory / f"{s}.ref_logps.npy").is_file()]
    if missing:
        params, _ = run.newest_params(
            cfg.train.init_from, abstract_params(cfg.model, layout), f"train.init_from={cfg.train.init_from}"
        )
        score = pair_scorer(cfg.model, layout)
        micro, pi, pc = cfg.train.batch_size // cfg.train.grad_accum, jax.process_index(), jax.process_count()
        began = time.perf_counter()
        for split in missing:
            source = getattr(data, split)
            out = np.zeros((len(source), 2), np.float32)
            batches = zip(range(0, len(source), micro), eval_batches(source, micro, len(source), pi, pc))
            for start, batch in progress(batches, -(-len(source) // micro), f"reference log-probs ({split})", log):
                with layout.activate():
                    logps = np.asarray(score(params, layout.put_batch(batch)))
                # global row j is host j // per_host's (j % per_host)-th row: source row start + host + k * hosts
                index = [start + j // (micro // pc) + (j % (micro // pc)) * pc for j in range(micro)]
                keep = [j for j, i in enumerate(index) if i < len(source)]
                out[[index[j] for j in keep]] = logps[keep]
            save_array(directory / f"{split}.ref_logps.npy", out)
        log(
            f"reference log-probs of {', '.join(missing)} pairs from {cfg.train.init_from} "
            f"in {time.perf_counter() - began:.0f} s -> {directory}/<split>.ref_logps.npy"
        )
    return dataclasses.replace(data, train=ExampleRows(directory, "train"), val=ExampleRows(directory, "val"))
