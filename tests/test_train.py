"""The spine end to end: pretrain -> checkpoint -> resume -> export -> probe, and its failure modes.

Tiny ResNet on a tiny phantom store, 8 fake CPU devices (tests/conftest.py), so the sharded path is the
one exercised.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import final_state, tiny_pretrain_config
from medssl_jax import checkpoint, main, models, train
from medssl_jax.data import phantoms
from medssl_jax.data.store import Store, StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


tiny_config = tiny_pretrain_config


def test_micle_end_to_end_writes_export_and_summary(phantom_cache, tmp_path):
    workdir = str(tmp_path / "run")
    summary = main.run(tiny_config(phantom_cache), workdir)
    assert set(summary) >= {"mean_auc", "per_label_auc", "random_init"}
    assert 0.0 <= summary["mean_auc"] <= 1.0
    assert set(summary["per_label_auc"]) == set(phantoms.LABEL_NAMES)
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["mean_auc"] == pytest.approx(summary["mean_auc"])
    assert "mean_auc" in on_disk["random_init"]
    # The baseline is fair (the residual-branch init better on validation, BN statistics from the train
    # images) and the summary says so; the paired comparison is the one `compare` computes.
    baseline, choice = on_disk["random_init"]["baseline"], on_disk["random_init"]["choice"]
    assert choice["val_mean_auc"][choice["chosen"]] == max(choice["val_mean_auc"].values())
    assert baseline["architecture"]["zero_init_last_bn"] is choice["zero_init_last_bn"]
    assert baseline["batch_stats"].startswith("recomputed on")
    vs = on_disk["vs_random_init"]
    assert set(vs) >= {"mean_auc_diff", "ci95", "p_value"}
    assert vs["mean_auc_diff"] == pytest.approx(on_disk["mean_auc"] - on_disk["random_init"]["mean_auc"])
    assert vs["ci95"][0] <= vs["mean_auc_diff"] <= vs["ci95"][1] and 0 <= vs["p_value"] <= 1
    assert main.summary_line(on_disk).startswith("linear probe test mean AUC")
    # metrics.jsonl has one line per log step with loss, lr and the rate.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert all(np.isfinite(line["loss"]) and "lr" in line and "views_per_s" in line for line in lines)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    # The export reloads with orbax + the model module alone and gives features.
    variables, config = checkpoint.load_export(os.path.join(workdir, "export"))
    assert config["input"]["normalization"] is None  # our pretraining feeds [0, 1] pixels, and says so
    encoder = models.build_encoder({**config["model"], "dtype": "float32"})
    features, out = encoder.apply(variables, np.zeros((2, 24, 24, 1), np.float32), train=False)
    assert features.shape == (2, out["pre_logits"].shape[-1])


def test_unlabelled_store_without_test_split_skips_the_probe_in_one_line(phantom_cache, tmp_path, capsys):
    # A DICOM store is normally unlabelled and has no test split: pretraining finishes and exports, and the
    # probe is skipped with the reason and the command to probe on a labelled store.
    from medssl_jax.data.store import StoreWriter

    source = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    with StoreWriter(tmp_path / "dicomlike", name="dicomlike", label_names=()) as writer:
        for i in range(len(source)):
            record = source[i]
            writer.add(image=record["image"], patient=str(source.patients[i]), bits_stored=record["bits_stored"],
                       modality="CR")
    config = tiny_config(phantom_cache, **{"data.store": str(tmp_path / "dicomlike"), "total_steps": 2})
    assert main.run(config, str(tmp_path / "w")) is None
    out = capsys.readouterr().out
    assert "linear probe skipped: store" in out and "has no labels" in out and "configs/linear_probe.py" in out
    assert os.path.exists(tmp_path / "w" / "export" / "config.json")


def test_resume_equals_uninterrupted(phantom_cache, tmp_path):
    """N steps + interruption + resume to 2N gives bitwise the parameters of 2N uninterrupted."""
    config = tiny_config(phantom_cache, total_steps=6, checkpoint_every=3)
    config.probe.enabled = False
    straight = str(tmp_path / "straight")
    train.pretrain(config, straight)
    interrupted = str(tmp_path / "interrupted")
    first = train.pretrain(config, interrupted, stop_after=3)
    assert first.steps_done == 3 and first.export_dir is None
    second = train.pretrain(config, interrupted)
    assert second.steps_done == 6
    step_a, state_a = final_state(straight)
    step_b, state_b = final_state(interrupted)
    assert step_a == step_b == 6
    leaves_a = jax.tree.leaves(state_a)
    leaves_b = jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_store_is_one_clear_error(tmp_path):
    config = tiny_config(str(tmp_path), **{"data.store": str(tmp_path / "nope")})
    with pytest.raises(StoreError, match="nope"):
        main.run(config, str(tmp_path / "w"))


def test_wrong_store_version_is_reported(phantom_cache, tmp_path):
    import shutil

    source = phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0)
    copy = tmp_path / "store"
    shutil.copytree(source, copy)
    meta = json.loads((copy / "store.json").read_text())
    meta["version"] = 999
    (copy / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="version"):
        main.run(tiny_config(phantom_cache, **{"data.store": str(copy)}), str(tmp_path / "w"))


def test_batch_not_divisible_by_devices(phantom_cache, tmp_path):
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        main.run(tiny_config(phantom_cache, batch_size=12), str(tmp_path / "w"))


def test_unknown_config_key_inside_a_config_file(phantom_cache, tmp_path):
    config = tiny_config(phantom_cache)
    config.optim.weight_decy = 1e-4  # the typo a user makes editing a config file
    with pytest.raises(ValueError, match="unknown config key 'optim.weight_decy'"):
        main.run(config, str(tmp_path / "w"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(phantom_cache, tmp_path, monkeypatch):
    import dataclasses

    from medssl_jax.methods import simclr

    def poisoned(*args, step, **kwargs):
        loss, aux = simclr.loss_fn(*args, step=step, **kwargs)
        return jax.numpy.where(step >= 4, jax.numpy.nan, loss), aux

    monkeypatch.setattr(simclr, "METHOD", dataclasses.replace(simclr.METHOD, loss_fn=poisoned))
    config = tiny_config(phantom_cache, total_steps=6, checkpoint_every=3, log_every=1)
    workdir = str(tmp_path / "w")
    with pytest.raises(train.TrainingError, match="non-finite loss=nan at step 5.*last good checkpoint: step 3"):
        train.pretrain(config, workdir)
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_cli_reports_config_typo_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medssl_jax.main", "--config=configs/micle.py:runlocal",
         f"--workdir={tmp_path}", "--config.optim.weight_decy=0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "weight_decy" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(phantom_cache, tmp_path):
    """A preempted run (SIGTERM) checkpoints the step it is at and exits 0; rerunning resumes."""
    import signal
    import time

    workdir = tmp_path / "w"
    overrides = [
        f"--config.data.cache_dir={phantom_cache}", "--config.data.phantom_patients=64",
        "--config.data.phantom_size=32", "--config.data.image_size=24", "--config.probe.image_size=24",
        "--config.model.base_width=4",
        "--config.head.hidden_dim=16", "--config.head.out_dim=8", "--config.batch_size=16",
        "--config.total_steps=100000", "--config.log_every=1", "--config.checkpoint_every=100000",
        "--config.monitor.every=0",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "medssl_jax.main", "--config=configs/micle.py:runlocal",
         f"--workdir={workdir}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved checkpoint at step" in stdout
    saved = int(stdout.split("SIGTERM: saved checkpoint at step")[1].split(";")[0])
    ckpt = checkpoint.TrainCheckpointer(str(workdir / "checkpoints"))
    assert ckpt.latest_step() == saved >= 2
    ckpt.close()
    assert not (workdir / "export").exists()  # preempted: no export, the rerun continues
