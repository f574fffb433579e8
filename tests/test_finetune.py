"""finetune mode: a few steps of a tiny ResNet / ViT on a tiny phantom store, 8 fake CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_RESNET, tiny_eval_config
from medssl_jax import checkpoint, main, models
from medssl_jax.data import phantoms
from medssl_jax.data.store import Store
from medssl_jax.evaluate import finetune, linear_probe, records, report
from medssl_jax.evaluate import splits as splits_lib

TINY_VIT = {"name": "vit", "variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
            "image_size": 24, "pos_interp": "size"}


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def ft_config(cache_dir, init, **overrides):
    return tiny_eval_config(finetune.reference_config(), cache_dir, init, **{
        "batch_size": 16, "crop_scale": (0.5, 1.0), "total_steps": 6, "eval_every": 2, "log_every": 2,
        "early_stop_patience": 0, **overrides})


@pytest.fixture(scope="module")
def ssl_run(phantom_cache, tmp_path_factory):
    """Fine-tune from a (randomly initialised) tiny export: two label fractions, robustness, shift store."""
    root = tmp_path_factory.mktemp("ft")
    encoder = models.build_encoder({**TINY_RESNET, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, 24, 24, 1)), train=False))(jax.random.PRNGKey(1))
    export = checkpoint.save_export(str(root / "export"), jax.device_get(variables),
                                    {"model": TINY_RESNET, "source": {"method": "micle"}})
    shift_store = str(phantoms.ensure_phantom_store(phantom_cache, num_patients=16, image_size=32, seed=5))
    workdir = str(root / "ssl")
    config = ft_config(phantom_cache, export, label_fractions=(0.5, 1.0), robustness=True, shift_store=shift_store,
                       label_map=(("effusion", "effusion"),))
    summary = main.run(config, workdir)
    return {"workdir": workdir, "summary": summary, "shift_store": shift_store, "config": config}


def test_selects_the_validation_best_step_and_writes_eval(ssl_run):
    workdir, summary = ssl_run["workdir"], ssl_run["summary"]
    with open(os.path.join(workdir, "eval", "curves.json")) as f:
        curves = json.load(f)
    assert curves["steps"] == [2, 4, 6]
    values = [-np.inf if v is None else v for v in curves["val_auc"]]
    assert summary["extra"]["best_step"] == curves["steps"][int(np.argmax(values))]
    assert summary["mode"] == "finetune" and summary["method"] == "micle" and summary["label_fraction"] == 1.0
    run = records.read_eval(workdir)
    splits = splits_lib.load(os.path.join(workdir, "splits.json"))
    np.testing.assert_array_equal(np.sort(run.record_ids), splits.test)
    with open(os.path.join(workdir, "eval", "label_fractions.json")) as f:
        assert [e["fraction"] for e in json.load(f)["fractions"]] == [0.5, 1.0]
    assert records.read_eval(os.path.join(workdir, "fractions", "f0.5")).summary["label_fraction"] == 0.5
    with open(os.path.join(workdir, "eval", "robustness.json")) as f:
        assert set(json.load(f)) == {"intensity", "gamma", "rotation", "zoom"}
    # The test scalars are in TensorBoard too, at the selected step.
    scalars = _tensorboard_scalars(os.path.join(workdir, "eval", "tensorboard"))
    assert scalars["test/mean_auc"] == (summary["extra"]["best_step"], pytest.approx(summary["mean_auc"]))
    assert {f"test/auc/{n}" for n in summary["per_label_auc"] if summary["per_label_auc"][n] is not None} <= set(scalars)


def _tensorboard_scalars(directory):
    """{tag: (step, value)} read back from the event files (TFRecord framing of tensorboardX's Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found[value.tag] = (event.step, value.simple_value)
    return found


def test_test_predictions_come_from_the_saved_selected_model(ssl_run, phantom_cache):
    workdir = ssl_run["workdir"]
    variables, config = checkpoint.load_export(os.path.join(workdir, "export"))
    head = np.load(os.path.join(workdir, "export", "head.npz"))
    encoder = models.build_encoder({**config["model"], "dtype": "float32"})
    assert config["source"]["steps"] == ssl_run["summary"]["extra"]["best_step"]
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    run = records.read_eval(workdir)
    images, _ = linear_probe.load_images(store, run.record_ids, image_size=24, batch_size=64)
    features, _ = encoder.apply(variables, images.astype(np.float32) / 65535.0, train=False)
    probs = 1 / (1 + np.exp(-(np.asarray(features) @ head["kernel"] + head["bias"])))
    np.testing.assert_allclose(probs, run.probs, atol=2e-5)


def test_pos_weight_comes_from_the_train_split_only(ssl_run, phantom_cache):
    workdir = ssl_run["workdir"]
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    splits = splits_lib.load(os.path.join(workdir, "splits.json"))
    expected, _ = finetune.pos_weight_for(store.labels[splits.train], store.label_names)
    np.testing.assert_allclose(ssl_run["summary"]["extra"]["pos_weight"], expected, rtol=1e-6)
    everything, _ = finetune.pos_weight_for(store.labels, store.label_names)
    assert not np.allclose(expected, everything)
    half = records.read_eval(os.path.join(workdir, "fractions", "f0.5")).summary["extra"]["pos_weight"]
    np.testing.assert_allclose(half, finetune.pos_weight_for(store.labels[splits.fraction_ids(0.5)],
                                                             store.label_names)[0], rtol=1e-6)


def test_distribution_shift_eval_has_the_other_stores_fingerprint(ssl_run):
    shift = records.read_eval(os.path.join(ssl_run["workdir"], "shift"))
    assert shift.store_fingerprint == records.store_fingerprint(ssl_run["shift_store"])
    assert shift.label_names == list(phantoms.LABEL_NAMES) and shift.summary["mode"] == "eval"
    assert len(shift.record_ids) == len(Store(ssl_run["shift_store"]).ids("test"))


def test_random_init_vit_and_compare(ssl_run, phantom_cache, tmp_path):
    workdir = str(tmp_path / "random_vit")
    config = ft_config(phantom_cache, "random", total_steps=4, model=dict(TINY_VIT))
    config.optim.name, config.optim.base_lr, config.optim.lr_scaling = "adamw", 1e-3, "none"
    summary = main.run(config, workdir)
    assert summary["init"] == "random" and summary["method"] == "none"
    out = str(tmp_path / "report")
    report.compare_runs([ssl_run["workdir"], workdir], out, num_resamples=50)
    with open(os.path.join(out, "comparison.json")) as f:
        assert json.load(f)["convergence"]  # the SSL run's curve against the random-init run's


def test_pos_weight_for_masks_missing_and_names_labels_without_positives():
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [0, np.nan, 0], [np.nan, 0, 0]], np.float32)
    weight, empty = finetune.pos_weight_for(labels, ["a", "b", "c"])
    np.testing.assert_allclose(weight, [2.0, 1.0, 2.0])
    assert empty == ["b"]


def test_bad_shift_label_map_fails_before_training(phantom_cache, tmp_path):
    config = ft_config(phantom_cache, "random", shift_store=str(
        phantoms.ensure_phantom_store(phantom_cache, num_patients=16, image_size=32, seed=5)),
        label_map=(("Effusion", "effusion"),))
    with pytest.raises(ValueError, match="'Effusion' is not a store label") as error:
        main.run(config, str(tmp_path / "e"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(str(tmp_path / "e" / "eval"))


def test_train_iterator_yields_labelled_batches_of_the_given_records(phantom_cache):
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    ids = store.ids("train")[:20]
    iterator = finetune.make_train_iterator(store, ids, image_size=24, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33),
                                            flip=True, batch_size_per_host=8, seed=0)
    batch = next(iterator)
    assert batch["image"].shape == (8, 24, 24, 1) and batch["image"].dtype == np.uint16
    assert batch["labels"].shape == (8, len(store.label_names))
    rows = {tuple(np.nan_to_num(r, nan=-1)) for r in store.labels[ids]}
    assert all(tuple(np.nan_to_num(r, nan=-1)) in rows for r in batch["labels"])
    with pytest.raises(ValueError, match="fewer than the batch"):
        finetune.make_train_iterator(store, ids[:4], image_size=24, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33),
                                     flip=True, batch_size_per_host=8, seed=0)


def test_arms_train_until_validation_stops_improving_and_say_whether_they_converged(phantom_cache, tmp_path):
    # Patience with a maximum: a run that stops early converged; one cut off by total_steps did not, and
    # compare then refuses to call the step reduction a convergence figure.
    encoder = models.build_encoder({**TINY_RESNET, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, 24, 24, 1)), train=False))(jax.random.PRNGKey(2))
    export = checkpoint.save_export(str(tmp_path / "export"), jax.device_get(variables),
                                    {"model": TINY_RESNET, "source": {"method": "simclr"}})
    tiny_lr = finetune.reference_config().optim
    tiny_lr.base_lr = 1e-7  # the validation AUC cannot improve: patience 1 stops after two evaluations
    stopped = main.run(ft_config(phantom_cache, export, total_steps=40, eval_every=2, early_stop_patience=1,
                                 optim=tiny_lr), str(tmp_path / "stopped"))
    assert stopped["extra"]["converged"] is True and stopped["extra"]["steps_run"] < 40
    capped = main.run(ft_config(phantom_cache, "random", total_steps=4, eval_every=2, early_stop_patience=50),
                      str(tmp_path / "capped"))
    assert capped["extra"]["converged"] is False and capped["extra"]["steps_run"] == 4
    assert capped["metrics"]["threshold_source"] == "validation"
    out = str(tmp_path / "report")
    comparison = report.compare_runs([str(tmp_path / "stopped"), str(tmp_path / "capped")], out, num_resamples=20)
    row = comparison["convergence"][0]
    assert (row["ssl_converged"], row["random_converged"]) == (True, False)
    with open(os.path.join(out, "report.md")) as f:
        assert "Not comparable" in f.read()


def test_indomain_arm_transfers_the_whole_model_and_the_heads_of_shared_labels(ssl_run, phantom_cache, tmp_path):
    from medssl_jax import config_lib

    export = os.path.join(ssl_run["workdir"], "export")
    with np.load(os.path.join(export, "head.npz")) as f:
        saved = {k: f[k] for k in ("kernel", "bias", "label_names")}
    names = [str(n) for n in saved["label_names"]]
    # Columns follow the new store's label order (matched by name, any case); an unknown label stays fresh.
    wanted = [names[1].upper(), "not_in_the_saved_head", names[0]]
    kernel, bias, moved = finetune.aligned_head(np.zeros((saved["kernel"].shape[0], 3)), np.zeros(3), wanted, saved)
    assert moved == [wanted[0], names[0]]
    np.testing.assert_array_equal(kernel[:, 0], saved["kernel"][:, 1])
    np.testing.assert_array_equal(kernel[:, 2], saved["kernel"][:, 0])
    assert not kernel[:, 1].any() and bias[1] == 0 and bias[2] == saved["bias"][0]

    # End to end through configs/dinov2_finetune.py's in-domain arm: with a vanishing learning rate, the
    # weights after two steps are the init's, head included.
    config = config_lib.load_config("dinov2_finetune", f"runlocal,arm=indomain,init={export}")
    assert config.init_head and config.method == "indomain_supervised"
    config.data.update(cache_dir=phantom_cache, phantom_patients=64, phantom_size=32)
    config.update(image_size=24, batch_size=16, total_steps=2, eval_every=2, log_every=2)
    config.optim.base_lr = 1e-12
    workdir = str(tmp_path / "indomain")
    summary = main.run(config, workdir)
    assert summary["method"] == "indomain_supervised" and summary["init"] == export
    with np.load(os.path.join(workdir, "export", "head.npz")) as f:
        np.testing.assert_allclose(f["kernel"], saved["kernel"], atol=1e-6)
    before, _ = checkpoint.load_export(export)
    after, _ = checkpoint.load_export(os.path.join(workdir, "export"))
    np.testing.assert_allclose(after["params"]["stem"]["conv"]["kernel"], before["params"]["stem"]["conv"]["kernel"],
                               atol=1e-6)
    config.init = "random"
    with pytest.raises(ValueError, match="init_head=True needs config.init to be a fine-tune's export"):
        main.run(config, str(tmp_path / "bad"))


def test_multi_class_task_is_softmax_top1_and_macro_auc_and_compares_top1(phantom_cache, tmp_path):
    from test_medmnist import make_npz

    from medssl_jax.data import medmnist

    store_path = str(tmp_path / "derm")
    medmnist.write_store(make_npz(tmp_path / "dermamnist.npz", channels=3, classes=7), store_path)
    config = ft_config(phantom_cache, "random", total_steps=4, task="multi_class")
    config.data.store = store_path
    runs = [str(tmp_path / "run")]
    summary = main.run(config, runs[0])
    assert summary["metrics"]["top1_accuracy"] == summary["top1_accuracy"] and 0 <= summary["top1_accuracy"] <= 1
    run = records.read_eval(runs[0])
    np.testing.assert_allclose(run.probs.sum(axis=1), 1.0, rtol=1e-5)  # softmax over the 7 classes
    correct = np.argmax(run.probs, axis=1) == np.argmax(run.labels, axis=1)
    assert run.summary["top1_accuracy"] == pytest.approx(correct.mean())
    # compare's top-1 rows, against a second "model" whose scores are the first's with the classes rolled.
    runs.append(str(tmp_path / "rolled"))
    records.write_eval(runs[1], probs=np.roll(run.probs, 1, axis=1), labels=run.labels, record_ids=run.record_ids,
                      label_names=run.label_names, mode="finetune", method="none", init="random", split=run.split,
                      store_name=run.summary["store"]["name"], store_fingerprint=run.store_fingerprint)
    out = str(tmp_path / "report")
    report.compare_runs(runs, out, num_resamples=50)
    with open(os.path.join(out, "comparison.json")) as f:
        comparison = json.load(f)
    top1 = comparison["bootstrap"]["models"]["run"]["top1_accuracy"]
    assert top1["point"] == pytest.approx(correct.mean()) and top1["ci_low"] <= top1["point"] <= top1["ci_high"]
    assert "top-1 accuracy" in open(os.path.join(out, "report.md")).read()
    assert "top1_accuracy" in comparison["bootstrap"]["comparisons"][0]
    # A multi-label store is refused in one line before any training.
    config = ft_config(phantom_cache, "random", task="multi_class")
    with pytest.raises(ValueError, match="config.task='multi_class' needs one-hot labels") as error:
        main.run(config, str(tmp_path / "bad"))
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "bad" / "eval")
