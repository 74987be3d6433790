"""Which checkpoint step counts as written: orbax's completion marker on either kind of file system."""

from __future__ import annotations

import shutil

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path.atomicity import CommitFileTemporaryPath

from llm_jax.run import COMMIT_FILE, complete_steps, latest_checkpoint


def _save_step(directory, step: int, **options) -> None:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=True, **options), item_names=("state",)
    )
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(4.0)})), force=True)
    manager.wait_until_finished()
    manager.close()


def test_a_temporary_step_beside_a_complete_one_is_not_chosen(tmp_path):
    """Local disk: orbax writes under a temporary name and renames the step when it is complete."""
    directory = epath.Path(tmp_path)
    _save_step(directory, 10)
    half = directory / "20.orbax-checkpoint-tmp-1796169961"  # a save cut off by a preemption
    shutil.copytree(directory / "10", half)
    assert latest_checkpoint(directory) == directory / "10"
    _save_step(directory, 30)
    assert latest_checkpoint(directory) == directory / "30"


def test_a_step_without_its_commit_file_is_not_chosen(tmp_path):
    """gs:// style (orbax's commit-file mode, here on a local disk): the step directory has its
    final name at once; the commit file marks it complete."""
    directory = epath.Path(tmp_path)
    _save_step(directory, 10, temporary_path_class=CommitFileTemporaryPath)
    assert (directory / "10" / COMMIT_FILE).exists()
    half = directory / "20"
    shutil.copytree(directory / "10", half)
    (half / COMMIT_FILE).unlink()  # everything written but the marker
    assert complete_steps(directory, commit_files=True) == [10]
    (half / COMMIT_FILE).write_text("done")
    assert sorted(complete_steps(directory, commit_files=True)) == [10, 20]


def test_steps_copied_from_a_bucket_and_new_local_ones_both_count(tmp_path):
    directory = epath.Path(tmp_path)
    _save_step(directory, 10, temporary_path_class=CommitFileTemporaryPath)  # as copied down from gs://
    _save_step(directory, 20)  # the run resumed on local disk: renamed when complete, no commit file
    assert latest_checkpoint(directory) == directory / "20"


def test_no_complete_step_means_none(tmp_path):
    directory = epath.Path(tmp_path)
    assert latest_checkpoint(directory / "missing") is None
    (directory / "5.orbax-checkpoint-tmp-1" / "state").mkdir(parents=True)
    assert latest_checkpoint(directory) is None
