"""linear_probe mode and the evaluation splits: tiny ResNet export, tiny phantom store, 8 fake CPU devices."""

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
from medssl_jax.evaluate import features, linear_probe, probe, records, report
from medssl_jax.evaluate import splits as splits_lib



@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def save_tiny_export(directory, model_config=TINY_RESNET, *, seed=1, size=24):
    encoder = models.build_encoder({**model_config, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, size, size, 1)), train=False))(
        jax.random.PRNGKey(seed))
    checkpoint.save_export(str(directory), jax.device_get(variables),
                           {"model": dict(model_config), "source": {"method": "simclr"}})
    return str(directory)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("run") / "export")


def probe_config(cache_dir, init, **overrides):
    return tiny_eval_config(linear_probe.reference_config(), cache_dir, init,
                            **{"batch_size": 32, "c_grid": (0.1, 1.0), **overrides})


def test_probe_export_and_random_write_comparable_eval_dirs(phantom_cache, tiny_export, tmp_path):
    ssl_dir, random_dir = str(tmp_path / "ssl"), str(tmp_path / "random")
    summary = main.run(probe_config(phantom_cache, tiny_export, label_fractions=(0.5, 1.0), robustness=True),
                       ssl_dir)
    main.run(probe_config(phantom_cache, "random"), random_dir)
    assert summary["mode"] == "linear_probe" and summary["method"] == "simclr" and summary["init"] == tiny_export
    assert summary["label_fraction"] == 1.0 and summary["extra"]["c"] in (0.1, 1.0)
    assert set(summary["per_label_auc"]) == set(phantoms.LABEL_NAMES)
    # Several fractions: label_fractions.json in E/eval and one eval dir per fraction.
    with open(os.path.join(ssl_dir, "eval", "label_fractions.json")) as f:
        fractions = json.load(f)["fractions"]
    assert [e["fraction"] for e in fractions] == [0.5, 1.0]
    assert fractions[0]["num_train"] < fractions[1]["num_train"]
    assert records.read_eval(os.path.join(ssl_dir, "fractions", "f0.5")).summary["label_fraction"] == 0.5
    with open(os.path.join(ssl_dir, "eval", "robustness.json")) as f:
        assert set(json.load(f)) == {"intensity", "gamma", "rotation", "zoom"}
    # The two runs share splits (made independently from the same store and seed) and test records.
    splits_a = splits_lib.load(os.path.join(ssl_dir, "splits.json"))
    splits_b = splits_lib.load(os.path.join(random_dir, "splits.json"))
    assert splits_a.fingerprint == splits_b.fingerprint
    np.testing.assert_array_equal(splits_a.test, splits_b.test)
    assert records.read_eval(random_dir).summary["method"] == "none"
    out = str(tmp_path / "report")
    report.compare_runs([ssl_dir, random_dir], out, num_resamples=50)
    assert os.path.exists(os.path.join(out, "report.md"))
    # Features were cached once per encoder (a random ResNet: one per residual-branch init): a rerun of the
    # same workdir reuses them and the splits.
    cached = [d for d in os.listdir(os.path.join(random_dir, "cache"))]
    assert len(cached) == 2
    again = main.run(probe_config(phantom_cache, "random"), random_dir)
    assert again["mean_auc"] == pytest.approx(records.read_eval(random_dir).summary["mean_auc"])


def test_splits_patient_wise_nested_and_deterministic(phantom_cache):
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    cfg = probe_config(phantom_cache, "random").splits
    cfg.val = "train"  # carve the validation patients from train by hash (the store's own val split aside)
    fractions = (0.1, 0.25, 0.5, 1.0)
    a = splits_lib.make_splits(store, cfg, fractions)
    b = splits_lib.make_splits(store, cfg, fractions)
    assert a.fingerprint == b.fingerprint
    patients = {name: set(store.patients[getattr(a, name)]) for name in ("train", "val", "test")}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    np.testing.assert_array_equal(a.fraction_ids(1.0), a.train)
    previous = set()
    for fraction in fractions:
        ids = set(a.fraction_ids(fraction).tolist())
        assert previous <= ids  # nested
        chosen = set(store.patients[list(ids)])
        # patient-wise: a chosen patient brings all of its train records
        assert ids == {int(i) for i in a.train if store.patients[i] in chosen}
        assert len(chosen) == max(1, int(np.ceil(fraction * len(patients["train"]))))
        previous = ids
    other_seed = cfg.copy_and_resolve_references()
    other_seed.seed = 1
    assert splits_lib.make_splits(store, other_seed, fractions).fingerprint != a.fingerprint


def test_splits_reuse_is_checked(phantom_cache, tmp_path):
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    cfg = probe_config(phantom_cache, "random").splits
    cfg.val = "train"
    first = splits_lib.resolve(str(tmp_path / "a"), store, cfg, (1.0,))
    changed = cfg.copy_and_resolve_references()
    changed.val_fraction = 0.3
    with pytest.raises(splits_lib.SplitsError, match="other splits"):
        splits_lib.resolve(str(tmp_path / "a"), store, changed, (1.0,))
    # Another workdir can reuse the file explicitly, even with other split parameters in its config.
    changed.file = str(tmp_path / "a" / "splits.json")
    reused = splits_lib.resolve(str(tmp_path / "b"), store, changed, (1.0,))
    assert reused.fingerprint == first.fingerprint
    other = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=16, image_size=32, seed=3))
    with pytest.raises(splits_lib.SplitsError, match="another store"):
        splits_lib.resolve(str(tmp_path / "c"), other, changed, (1.0,))
    with pytest.raises(splits_lib.SplitsError, match="label_fractions"):
        splits_lib.check_fractions((0.0, 1.0))


def test_bad_init_is_one_clear_line(phantom_cache, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nope") as error:
        main.run(probe_config(phantom_cache, str(tmp_path / "nope")), str(tmp_path / "e"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="config.init is empty"):
        main.run(probe_config(phantom_cache, ""), str(tmp_path / "e"))


def test_checkpoint_that_does_not_fit_is_reported(phantom_cache, tmp_path):
    export = save_tiny_export(tmp_path / "export")
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    config["model"]["depth"] = 34  # the weights are a ResNet-18's
    with open(os.path.join(export, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the chosen architecture: missing") as error:
        main.run(probe_config(phantom_cache, export), str(tmp_path / "e"))
    assert "\n" not in str(error.value)


def test_unknown_config_key_is_refused(phantom_cache, tmp_path):
    config = probe_config(phantom_cache, "random")
    config.c_gird = (1.0,)
    with pytest.raises(ValueError, match="c_gird"):
        main.run(config, str(tmp_path / "e"))


def test_bench_features_reports_a_rate():
    encoder = models.build_encoder({**TINY_RESNET, "dtype": "float32"})
    variables = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 1)), train=False)
    from medssl_jax import sharding

    result = features.bench_features(encoder, variables, image_size=24, channels=1, batch_size=16,
                                     mesh=sharding.make_mesh(), steps=2)
    assert result["images_per_s"] > 0 and result["devices"] == 8


def test_converted_rgb_vit_checkpoint_probes_a_grey_store(phantom_cache, tmp_path):
    """A converted DINOv2-style checkpoint (3-channel ViT, source format 'dinov2') on 1-channel images."""
    vit = {"name": "vit", "variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
           "image_size": 32, "in_chans": 3}
    encoder = models.build_encoder({**vit, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(2))
    export = checkpoint.save_export(str(tmp_path / "dinov2_tiny"), jax.device_get(variables),
                                    {"model": vit, "source": {"format": "dinov2", "file": "x.pth"}})
    summary = main.run(probe_config(phantom_cache, export), str(tmp_path / "e"))
    assert summary["method"] == "dinov2" and summary["num_examples"] > 0


@pytest.mark.parametrize("spec", ["linear_probe.py", "linear_probe.py:runlocal,init=random", "finetune.py",
                                  "finetune.py:runlocal", "dinov2_finetune.py", "dinov2_finetune.py:arm=in21k",
                                  "dinov2_finetune.py:arm=random", "dinov2_finetune.py:runlocal",
                                  "dinov2_finetune.py:arm=indomain,init=/e", "derm_finetune.py",
                                  "derm_finetune.py:runlocal,store=/s", "transfer.py", "transfer.py:runlocal,store=/s"])
def test_config_files_have_only_known_fields(spec):
    from medssl_jax import config_lib

    path, _, arg = spec.partition(":")
    config = config_lib.load_config(path, arg or None)
    config_lib.check_known_keys(config, main.reference_config(config))
    models.build_encoder({**config.model.to_dict(), "dtype": "float32"})  # the random-init architecture builds


def test_random_baseline_is_fair_and_says_how_it_was_built(phantom_cache, tmp_path):
    # init=random restricted to one residual-branch init: every branch active, BatchNorm statistics
    # recomputed on the train images, recorded in summary.json.
    config = probe_config(phantom_cache, "random", random_zero_init_grid=(False,))
    config.model = {**TINY_RESNET, "zero_init_last_bn": True}  # the grid's value is what is built
    summary = main.run(config, str(tmp_path / "fair"))
    assert "random_init_choice" not in summary["extra"]
    baseline = summary["extra"]["baseline"]
    assert baseline["residual_branches"] == "standard initialisation, every residual branch active"
    assert baseline["batch_stats"].startswith("recomputed on ") and "train images" in baseline["batch_stats"]
    # The operating points are measured at thresholds chosen on validation (not on test).
    assert summary["metrics"]["threshold_source"] == "validation"
    assert records.read_eval(str(tmp_path / "fair")).thresholds.shape == (len(phantoms.LABEL_NAMES),)


def test_random_resnet_probe_keeps_the_residual_init_that_is_better_on_validation(phantom_cache, tmp_path):
    # Both residual-branch inits are standard for a random ResNet: each is probed, and each label fraction keeps
    # the one with the better validation mean AUC (with C); what was compared is in summary.json. The
    # architecture names no residual init (as a user writes a ResNet): being a ResNet is what gives the choice.
    config = probe_config(phantom_cache, "random", label_fractions=(0.5, 1.0))
    assert "zero_init_last_bn" not in config.model
    workdir = str(tmp_path / "both")
    summary = main.run(config, workdir)
    labels = {"active residual branches", "zero-initialised residual branches"}
    for fraction in ("0.5", "1"):
        extra = records.read_eval(os.path.join(workdir, "fractions", f"f{fraction}")).summary["extra"]
        choice = extra["random_init_choice"]
        assert set(choice["val_mean_auc"]) == labels
        assert choice["val_mean_auc"][choice["chosen"]] == max(choice["val_mean_auc"].values())
        assert extra["val_mean_auc_by_c"][f"{extra['c']:g}"] == choice["val_mean_auc"][choice["chosen"]]
        zero = extra["baseline"]["architecture"]["zero_init_last_bn"]
        assert zero == choice["zero_init_last_bn"] == (choice["chosen"] == "zero-initialised residual branches")
    assert summary["extra"]["random_init_choice"]["chosen"] in labels
    assert len(os.listdir(os.path.join(workdir, "cache"))) == 2  # features of each variant, cached apart
    with pytest.raises(ValueError, match="random_zero_init_grid"):
        main.run(probe_config(phantom_cache, "random", random_zero_init_grid=(1,)), str(tmp_path / "bad"))


def test_recomputed_batch_stats_are_the_train_images_statistics(phantom_cache):
    # The stem BatchNorm's recomputed mean/variance equal those of the stem convolution's output over
    # exactly the images used (pooled over full batches, eval preprocessing).
    from medssl_jax import sharding
    from medssl_jax.data import pipeline

    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    encoder = models.build_encoder({**TINY_RESNET, "zero_init_last_bn": False, "dtype": "float32"})
    variables = jax.device_get(encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 1)), train=False))
    ids = store.ids("train")
    mesh = sharding.make_mesh([("data", -1)])
    new, used = features.recalibrate_batch_stats(encoder, variables, store, ids, image_size=24, batch_size=16,
                                                 mesh=mesh)
    assert used == len(ids) // 16 * 16
    load = pipeline.LoadForEval(store.data_source(), image_size=24, channels=1, num_labels=4)
    images = np.stack([load.map(int(i))["image"] for i in ids[:used]]).astype(np.float32) / 65535
    kernel = variables["params"]["stem"]["conv"]["kernel"]
    conv = jax.lax.conv_general_dilated(images, kernel, (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = np.asarray(conv, np.float64)
    np.testing.assert_allclose(new["batch_stats"]["stem"]["bn"]["mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["stem"]["bn"]["var"], conv.var(axis=(0, 1, 2)), rtol=1e-3,
                               atol=1e-6)
    assert not np.allclose(new["batch_stats"]["stem"]["bn"]["var"], 1.0)  # no longer the initial statistics


def test_store_val_split_is_the_default_validation_set(phantom_cache, tmp_path):
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    config = probe_config(phantom_cache, "random")
    made = splits_lib.make_splits(store, config.splits, (1.0,))
    np.testing.assert_array_equal(made.val, store.ids("val"))
    np.testing.assert_array_equal(made.train, store.ids("train"))
    assert "the store's 'val' split" in splits_lib.describe(made, store)
    config.splits.val = "train"  # carve from the train patients instead
    carved = splits_lib.make_splits(store, config.splits, (1.0,))
    assert set(carved.val) < set(store.ids("train")) and "carved" in splits_lib.describe(carved, store)


def test_c_at_the_edge_of_the_grid_is_warned():
    assert "widen the grid" in probe.check_c_choice(10.0, (0.1, 1.0, 10.0))
    assert "smallest" in probe.check_c_choice(0.1, (0.1, 1.0, 10.0))
    assert probe.check_c_choice(1.0, (0.1, 1.0, 10.0)) is None


def test_unlabelled_store_is_refused_up_front(phantom_cache, tmp_path):
    from medssl_jax.data.store import StoreWriter

    with StoreWriter(tmp_path / "dicomlike", name="dicomlike", label_names=()) as writer:
        for i in range(8):
            writer.add(image=np.full((32, 32), i, np.uint16), patient=f"p{i}", bits_stored=12)
    config = probe_config(phantom_cache, "random", **{"data.store": str(tmp_path / "dicomlike")})
    with pytest.raises(ValueError, match="cannot evaluate: store .* has no labels") as error:
        main.run(config, str(tmp_path / "w"))
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "w" / "cache")


def test_a_labelled_store_without_a_test_split_is_named_as_such(tmp_path):
    from medssl_jax.data.store import StoreWriter
    from medssl_jax.evaluate import workspace

    with StoreWriter(tmp_path / "s", name="s", label_names=("a",)) as writer:
        for i in range(6):
            writer.add(image=np.full((8, 8), i, np.uint16), patient=f"p{i}", labels=[i % 2], split="train")
    reason = workspace.unlabelled_reason(Store(tmp_path / "s"), train="train", test="test")
    assert reason.endswith("has no 'test' split (the test split)")
