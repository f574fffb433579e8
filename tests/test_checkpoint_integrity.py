"""Checkpoint damage is detected by checksum, named in one line, and the run falls back to the newest
intact checkpoint; the resumed run then equals an uninterrupted one bitwise (fault injection)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import final_state, tiny_pretrain_config
from medssl_jax import checkpoint, train
from medssl_jax.data import phantoms


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run and a run stopped after step 4 (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = str(root / "phantoms")
    phantoms.ensure_phantom_store(cache, num_patients=64, image_size=32, seed=0)
    config = tiny_pretrain_config(cache, total_steps=6, checkpoint_every=2, log_every=1, keep_checkpoints=3)
    config.probe.enabled = False
    train.pretrain(config, str(root / "straight"))
    train.pretrain(config, str(root / "stopped"), stop_after=4)
    return config, root


def _largest_data_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)]
    return max(files, key=os.path.getsize)


def flip_bytes(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def truncate(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def delete_manifest(step_dir):
    os.remove(glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True)[0])


def garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")


def empty_iterator_state(step_dir):
    (path,) = glob.glob(os.path.join(step_dir, "data", "*.json"))
    open(path, "w").close()


def remove_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def remove_checksums(step_dir):
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUM_FILE))


DAMAGES = [flip_bytes, truncate, delete_manifest, garbage_metadata, empty_iterator_state, remove_state,
           remove_checksums]


def test_every_saved_checkpoint_has_checksums_that_verify(runs):
    _, root = runs
    for step in (2, 4):
        step_dir = str(root / "stopped" / "checkpoints" / str(step))
        with open(os.path.join(step_dir, checkpoint.CHECKSUM_FILE)) as f:
            assert len(json.load(f)["files"]) > 3
        assert checkpoint.verify_checkpoint(step_dir) is None


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_damage_is_named_and_the_run_falls_back_to_the_previous_checkpoint(runs, tmp_path, damage, capsys):
    config, root = runs
    workdir = str(tmp_path / "w")
    shutil.copytree(root / "stopped", workdir)
    damage(os.path.join(workdir, "checkpoints", "4"))
    capsys.readouterr()
    result = train.pretrain(config, workdir)
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "checkpoint step 4" in line and "damaged" in line]
    assert len(warning) == 1, out
    assert "resumed from" in out and "(step 2, checksums verified)" in out
    assert result.steps_done == 6
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("4-")
    # Resuming from step 2 replays steps 3..6 exactly: the final state equals the uninterrupted run's.
    (step_a, state_a), (step_b, state_b) = final_state(str(root / "straight")), final_state(workdir)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # metrics.jsonl has every step once (the rows the interrupted run logged after step 2 were dropped).
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]


def test_no_intact_checkpoint_starts_fresh_and_says_so(runs, tmp_path, capsys):
    config, root = runs
    workdir = str(tmp_path / "w")
    shutil.copytree(root / "stopped", workdir)
    flip_bytes(os.path.join(workdir, "checkpoints", "4"))
    remove_state(os.path.join(workdir, "checkpoints", "2"))
    capsys.readouterr()
    train.pretrain(config, workdir)
    out = capsys.readouterr().out
    assert "NO intact checkpoint" in out and "starting from scratch" in out
    (_, state_a), (_, state_b) = final_state(str(root / "straight")), final_state(workdir)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_checkpoints_zero_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="keep_checkpoints=0"):
        checkpoint.TrainCheckpointer(str(tmp_path / "c"), keep=0)


def test_intact_checkpoint_of_another_config_is_refused_not_moved(runs, tmp_path):
    """Rerunning a workdir with a changed model is a config mismatch, not damage: one line, nothing moved."""
    config, root = runs
    workdir = tmp_path / "changed"
    shutil.copytree(root / "stopped", workdir)
    changed = config.copy_and_resolve_references()
    changed.model.base_width = config.model.base_width * 2
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4 .* intact but does not fit .* new --workdir"):
        train.pretrain(changed, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "damaged_checkpoints").exists()
