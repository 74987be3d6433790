"""The run directory: its layout, and every function that reads or writes one.

    <run_dir>/
      config.yaml          the resolved config (llm_jax.config.RUN_CONFIG; a rerun must keep the pinned keys)
      tokenizer.model      SentencePiece model (+ tokenizer.vocab), or an imported model's tokenizer.json;
                           an import's tokenizer_config.json, generation_config.json (data/tokenizer.py)
      data/                the prepared data (llm_jax/data/)
      checkpoints/<step>/  orbax: state (params, AdamW state, step, rng), data (grain iterator), meta (config);
                           under train.checkpoint_dir instead when that is set (a gs:// path works the same,
                           through etils.epath)
      metrics.jsonl, tb/, loss.png, samples.txt     written by training
      eval/step<N>.json    llm-jax eval's records

orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint behind; the newest complete step is the one restored. Saves are
asynchronous: arrays are copied to host memory, then written while training goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from llm_jax.config import RUN_CONFIG, Config, config_from_dict, save_config, saved_tree, to_dict
from llm_jax.data.tokenizer import BaseTokenizer, copy_tokenizer, load_tokenizer
from llm_jax.errors import UserError
from llm_jax.model.dense import inference_params
from llm_jax.parallel.sharding import Layout, abstract_params, single_device_layout

# Keys a run directory pins: its prepared data was built from the first group, its checkpoints
# (model shapes, data order) from both; an objective may pin more (llm_jax/train/objectives.py).
DATA_KEYS = (
    "seed",
    "model.vocab_size",
    "data.sources",
    "data.mixture",
    "data.prepared",
    "data.text_field",
    "data.txt_split_kb",
    "data.val_fraction",
    "data.tokenizer",
    "data.tokenizer_sample_bytes",
    "data.val_sources",
    "data.bad_rows",
    "data.shard_mb",
    "curate.",
    "train.objective",
    "train.init_from",
)
CHECKPOINT_KEYS = DATA_KEYS + ("model.", "train.batch_size", "optim.name")  # optim.name: the optimizer state
# How a step computes, not what it saves: a run resumes with any of these (parameters stay float32).
UNPINNED = ("model.dtype", "model.remat", "model.attention", "model.context_parallel") + tuple(
    f"model.moe.{k}" for k in ("aux_loss", "z_loss", "capacity_factor")
)

# Reading a step's state alone (restore_params) makes orbax warn that the step-level metadata file is
# absent; the parameters are complete without it.
logging.getLogger("absl").addFilter(lambda record: "Metadata file does not exist" not in record.getMessage())


def run_path(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser()


def tokenizer_path(run_dir: str | Path) -> Path:
    """The run's tokenizer: an imported tokenizer.json, else the sentencepiece tokenizer.model (which
    training writes there when there is none)."""
    imported = run_path(run_dir) / "tokenizer.json"
    return imported if imported.is_file() else run_path(run_dir) / "tokenizer.model"


def data_dir(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "data"


def metrics_path(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "metrics.jsonl"  # one JSON object per logged step and split


def tensorboard_dir(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "tb"


def loss_plot_path(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "loss.png"


def samples_path(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "samples.txt"


def eval_record_path(run_dir: str | Path, step: int) -> Path:
    return run_path(run_dir) / "eval" / f"step{step}.json"


def checkpoint_dir(run_dir: str | Path, configured: str | None) -> epath.Path:
    """train.checkpoint_dir if set, else <run_dir>/checkpoints."""
    return epath.Path(configured) if configured else epath.Path(os.path.abspath(run_path(run_dir))) / "checkpoints"


def saved_checkpoint_dir(run_dir: str | Path) -> epath.Path:
    """Where a run's checkpoints are, by the train.checkpoint_dir in its saved config."""
    return checkpoint_dir(run_dir, ((saved_tree(run_dir) or {}).get("train") or {}).get("checkpoint_dir"))


COMMIT_FILE = "commit_success.txt"  # orbax's completion marker where a rename is not atomic (gs://)


def latest_checkpoint(directory: epath.Path) -> epath.Path | None:
    """The newest complete step in a checkpoint directory (None if there is none)."""
    steps = complete_steps(directory, str(directory).startswith(("gs://", "s3://")))
    return directory / str(max(steps)) if steps else None


def complete_steps(directory: epath.Path, commit_files: bool) -> list[int]:
    """The steps orbax finished writing. On a local disk a step appears under its number only once
    written (renamed from a temporary name: orbax's is_path_finalized); on an object store
    (`commit_files`) the number appears at once and the step is complete when its commit file is
    there, so a step cut off by a preemption is never chosen. A step carrying a commit file (say,
    copied from a bucket) is complete anywhere."""
    if not directory.exists():
        return []
    steps = [p for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    return [
        int(p.name)
        for p in steps
        if (p / COMMIT_FILE).exists() or (not commit_files and ocp.path.step.is_path_finalized(p))
    ]


def restore_params(step_dir: epath.Path, abstract: Any) -> Any:
    """Only the parameters of a checkpoint (no optimizer state), placed per `abstract`'s shardings and cast
    to its dtypes as they are read (each device reads its own shards)."""
    _check_shapes(step_dir, abstract)
    restore_args = jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
    return out["params"]


def newest_params(run_dir: str | Path, abstract: Any, what: str) -> tuple[Any, epath.Path]:
    """The parameters of a run's newest checkpoint and its step directory; `what` names the run in the
    error when it has none."""
    directory = saved_checkpoint_dir(run_dir)
    step_dir = latest_checkpoint(directory)
    if step_dir is None:
        raise UserError(
            f"{what}: no checkpoint in {directory}; train that run first "
            f"(llm-jax train --config {run_path(run_dir) / RUN_CONFIG})"
        )
    return restore_params(step_dir, abstract), step_dir


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, loaded: what inference, evaluation and the tools read."""

    path: Path
    cfg: Config
    params: Any  # the newest checkpoint's parameters, placed by the layout it was loaded with
    tokenizer: BaseTokenizer
    step_dir: epath.Path  # checkpoints/<step>: its name is the step

    @property
    def step(self) -> int:
        return int(self.step_dir.name)


def load_config_of(run_dir: str | Path) -> Config:
    """The config a run was made with; a clear error where run_dir holds no run."""
    tree = saved_tree(run_dir)
    if tree is None:
        raise UserError(
            f"{run_path(run_dir)} is not a run directory (no {RUN_CONFIG}); train one with `llm-jax train --config ...`"
        )
    return config_from_dict(tree)


def load_run(run_dir: str | Path, layout: Layout | None = None, inference: bool = False) -> Run:
    """A run's config, tokenizer and newest parameters, read straight into their places: split over the
    layout's mesh by the run's rules (one device without a layout), and with `inference`, weight matrices
    in the compute dtype (model/dense.py's inference_params): no device ever holds the float32 tree."""
    cfg = load_config_of(run_dir)
    abstract = abstract_params(cfg.model, layout or single_device_layout())
    if inference:
        abstract = inference_params(cfg.model, abstract)
    params, step_dir = newest_params(run_dir, abstract, str(run_path(run_dir)))
    return Run(run_path(run_dir), cfg, params, load_tokenizer(tokenizer_path(run_dir)), step_dir)


def check_resumable(cfg: Config, run_dir: str | Path, pinned: tuple[str, ...] = ()) -> None:
    """A rerun in an existing run directory keeps the keys the directory pins (DATA_KEYS, and with a
    checkpoint CHECKPOINT_KEYS, plus `pinned`); every changed key is listed."""
    saved = saved_tree(run_dir)
    if saved is None:
        return
    keys = (
        CHECKPOINT_KEYS + pinned if latest_checkpoint(checkpoint_dir(run_dir, cfg.train.checkpoint_dir)) else DATA_KEYS
    )
    saved, current = _flatten(saved), _flatten(to_dict(cfg))
    changed = [
        f"{k}: {saved.get(k)!r} -> {current[k]!r}"
        for k in current
        if k.startswith(keys) and k not in UNPINNED and k in saved and saved[k] != current[k]
    ]
    if changed:
        raise UserError(
            f"{run_path(run_dir)} holds a run with a different config:\n  "
            + "\n  ".join(changed)
            + f"\nresume with the original values, or start a new run with run_dir=<new dir> "
            f"(or delete {run_path(run_dir)})"
        )


def save_run_config(cfg: Config, run_dir: str | Path) -> None:
    save_config(cfg, run_path(run_dir) / RUN_CONFIG)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_params_run(out: Path, cfg: Config, params: Any, step: str, tokenizer_from: Path) -> None:
    """A run directory holding only parameters (quantize, import-hf): config, the tokenizer
    `tokenizer_from` (a file, or a directory holding one) with the model files beside it, and
    checkpoints/<step>/state; written beside `out` and renamed, so it is whole or absent."""
    cfg = dataclasses.replace(cfg, run_dir=str(out), train=dataclasses.replace(cfg.train, checkpoint_dir=None))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_tokenizer(tokenizer_from, tmp)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((checkpoint_dir(tmp, None) / step / "state"), {"params": params})
    save_run_config(cfg, tmp)
    tmp.rename(out)


class Checkpointer:
    """The whole train state of a run's checkpoints: state, data-iterator position and metadata."""

    def __init__(self, cfg: Config):
        self.directory = checkpoint_dir(cfg.run_dir, cfg.train.checkpoint_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.train.keep_checkpoints, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores state (with the shardings in `abstract_state`) and the iterator's position."""
        _check_shapes(self.directory / str(step), abstract_state.params)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(step_dir: epath.Path, abstract: Any) -> None:
    """Compares saved parameter shapes with the config's before any array is read."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(step_dir / "state").item_metadata
    saved = _shapes(getattr(meta, "tree", meta)["params"])
    wanted = _shapes(abstract)
    diffs = [
        f"{k}: checkpoint {saved.get(k, 'absent')} vs config {wanted.get(k, 'absent')}"
        for k in sorted(saved.keys() | wanted.keys())
        if saved.get(k) != wanted.get(k)
    ]
    if diffs:
        raise UserError(
            f"checkpoint {step_dir} does not match the model config:\n  "
            + "\n  ".join(diffs[:8])
            + "\nuse the config the run was trained with, or a new run_dir"
        )


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape) for path, x in leaves}
