"""orbax checkpoints under train.checkpoint_dir (default <run_dir>/checkpoints; a gs:// path works the
same, through etils.epath): train state, data-iterator state and run metadata.

orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint behind; the newest complete step is the one restored. Saves are
asynchronous: arrays are copied to host memory, then written while training goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
import yaml
from etils import epath

from llm_jax.errors import UserError

# Reading a step's state alone (restore_params) makes orbax warn that the step-level metadata file is
# absent; the parameters are complete without it.
logging.getLogger("absl").addFilter(lambda record: "Metadata file does not exist" not in record.getMessage())


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores state (with the shardings in `abstract_state`) and the iterator's position."""
        _check_shapes(self.directory / str(step), abstract_state.params)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(run_dir: str | Path, configured: str | None) -> epath.Path:
    """train.checkpoint_dir if set, else <run_dir>/checkpoints."""
    return epath.Path(configured) if configured else epath.Path(os.path.abspath(os.path.expanduser(run_dir))) / "checkpoints"


def saved_checkpoint_dir(run_dir: str | Path) -> epath.Path:
    """Where a finished run's checkpoints are, by the train.checkpoint_dir in its config.yaml."""
    saved = Path(run_dir).expanduser() / "config.yaml"
    tree = (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
    return checkpoint_dir(run_dir, (tree.get("train") or {}).get("checkpoint_dir"))


def write_params_run(out: Path, cfg, params: Any, step: str, files: list[Path]) -> None:
    """A run directory holding only parameters (quantize, import-hf): config.yaml, `files` (the
    tokenizer) and checkpoints/<step>/state; written beside `out` and renamed, so it is whole or absent."""
    import shutil

    from llm_jax.config import save_config

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_dir=None))  # its own, inside out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in files:
        if path.is_file():
            shutil.copyfile(path, tmp / path.name)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((tmp / "checkpoints" / step / "state").absolute(), {"params": params})
    save_config(cfg, tmp / "config.yaml")
    tmp.rename(out)


def latest_checkpoint(directory: epath.Path) -> epath.Path | None:
    """The newest complete step in a checkpoint directory (None if there is none)."""
    if not directory.exists():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    return directory / str(max(steps)) if steps else None


def restore_params(step_dir: epath.Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint (no optimizer state), placed per `abstract_params` shardings."""
    _check_shapes(step_dir, abstract_params)
    restore_args = jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return out["params"]


def _check_shapes(step_dir: epath.Path, abstract_params: Any) -> None:
    """Compares saved parameter shapes with the config's before any array is read."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(step_dir / "state").item_metadata
    saved = _shapes(getattr(meta, "tree", meta)["params"])
    wanted = _shapes(abstract_params)
    diffs = [f"{k}: checkpoint {saved.get(k, 'absent')} vs config {wanted.get(k, 'absent')}"
             for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"checkpoint {step_dir} does not match the model config:\n  " + "\n  ".join(diffs[:8])
                        + "\nuse the config the run was trained with, or a new run_dir")


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape) for path, x in leaves}
