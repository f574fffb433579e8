"""finetune mode and the transfer study: tiny ResNet / ViT runs on a tiny phantom store, 8 fake CPU devices."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY_RESNET, set_fields, tiny_eval_config
from medssl_jax import checkpoint, config_lib, main, models, optim, sharding, train
from medssl_jax.data import phantoms
from medssl_jax.data.store import Store
from medssl_jax.evaluate import bootstrap, finetune, linear_probe, records, report, transfer
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import splits as splits_lib
from medssl_jax.methods import supervised

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = {"name": "vit", "variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
            "image_size": 24, "pos_interp": "size"}


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def ft_config(cache_dir, init, **overrides):
    """A fine-tune at test size: one lr, 6 steps of 16, validation every 2 steps, one seed."""
    return tiny_eval_config(finetune.reference_config(), cache_dir, init, **{
        "batch_size": 16, "crop_scale": (0.5, 1.0), "budget_grid": (6,), "eval_every": 2, "log_every": 2,
        "checkpoint_every": 6, "lr_grid": (0.1,), "backbone_lr_mults": (1.0,), "seeds": 1, "selection_evals": 2,
        **overrides})


def tiny_export(path, seed=1):
    encoder = models.build_encoder({**TINY_RESNET, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, 24, 24, 1)), train=False))(jax.random.PRNGKey(seed))
    return checkpoint.save_export(str(path), jax.device_get(variables), {"model": TINY_RESNET,
                                                                         "source": {"method": "micle"}})


@pytest.fixture(scope="module")
def ssl_run(phantom_cache, tmp_path_factory):
    """Fine-tune from a (randomly initialised) tiny export: two label fractions, a lower backbone lr in the
    grid, two seeds, robustness and a shift store."""
    root = tmp_path_factory.mktemp("ft")
    export = tiny_export(root / "export")
    shift_store = str(phantoms.ensure_phantom_store(phantom_cache, num_patients=16, image_size=32, seed=5))
    workdir = str(root / "ssl")
    config = ft_config(phantom_cache, export, label_fractions=(0.5, 1.0), robustness=True, shift_store=shift_store,
                       label_map=(("effusion", "effusion"),), backbone_lr_mults=(1.0, 0.1), seeds=2)
    summary = main.run(config, workdir)
    with open(os.path.join(workdir, "finetune.json")) as f:
        record = json.load(f)
    return {"workdir": workdir, "summary": summary, "shift_store": shift_store, "config": config, "record": record}


def test_each_fraction_chooses_on_validation_then_runs_the_seeds_and_writes_eval(ssl_run):
    workdir, summary, record = ssl_run["workdir"], ssl_run["summary"], ssl_run["record"]
    assert [f["fraction"] for f in record["fractions"]] == [0.5, 1.0]
    for fraction in record["fractions"]:
        assert {g["name"] for g in fraction["grid"]} == {"lr0.1_steps6", "lr0.1_steps6_bb0.1"}
        best = max(fraction["grid"], key=lambda g: -np.inf if g["score"] is None else g["score"])
        # The score is the mean of the last selection_evals validation readings of the run's curve.
        assert best["score"] == pytest.approx(np.mean(best["curve"]["val_auc"][-2:]))
        # Both settings are finalists (seed_top_k 2): each ran with both seeds, and the choice is the best
        # mean over the seeds of their validation scores, read back from each seed's run.
        assert [f["name"] for f in fraction["finalists"]][0] == best["name"]
        for finalist in fraction["finalists"]:
            runs = os.path.join(workdir, "runs", f"f{fraction['fraction']:g}", finalist["name"])
            seed_scores = []
            for seed in (0, 1):
                with open(os.path.join(runs, f"seed{seed}", finetune.RESULT_FILE)) as f:
                    seed_scores.append(json.load(f)["score"])
            assert finalist["seed_scores"] == pytest.approx(seed_scores)
            assert finalist["score"] == pytest.approx(np.mean(seed_scores))
        top = max(fraction["finalists"], key=lambda f: f["score"])
        assert fraction["chosen"]["name"] == top["name"] and fraction["chosen"]["score"] == top["score"]
        assert [s["seed"] for s in fraction["seeds"]] == [0, 1]
        aucs = [s["test_mean_auc"] for s in fraction["seeds"]]
        assert fraction["test_mean_auc"] == pytest.approx(np.mean(aucs))
        assert fraction["test_mean_auc_spread"] == pytest.approx(max(aucs) - min(aucs))
        seeds = finetune.read_seed_predictions(workdir, fraction["fraction"])
        assert seeds["probs"].shape[0] == 2
    assert summary["mode"] == "finetune" and summary["method"] == "micle" and summary["label_fraction"] == 1.0
    assert summary["extra"]["setting"]["name"] == record["fractions"][1]["chosen"]["name"]
    assert summary["mean_auc"] == pytest.approx(record["fractions"][1]["seeds"][0]["test_mean_auc"])
    run = records.read_eval(workdir)
    np.testing.assert_array_equal(np.sort(run.record_ids), splits_lib.load(os.path.join(workdir, "splits.json")).test)
    with open(os.path.join(workdir, "eval", "curves.json")) as f:
        assert json.load(f)["steps"] == [2, 4, 6]
    with open(os.path.join(workdir, "eval", "robustness.json")) as f:
        assert set(json.load(f)) == {"intensity", "gamma", "rotation", "zoom"}
    assert records.read_eval(os.path.join(workdir, "fractions", "f0.5")).summary["label_fraction"] == 0.5


def test_test_predictions_come_from_the_saved_selected_model(ssl_run, phantom_cache):
    workdir = ssl_run["workdir"]
    variables, config = checkpoint.load_export(os.path.join(workdir, "export"))
    head = np.load(os.path.join(workdir, "export", "head.npz"))
    encoder = models.build_encoder({**config["model"], "dtype": "float32"})
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    run = records.read_eval(workdir)
    images, _ = features_lib.load_images(store, run.record_ids, image_size=24, batch_size=64)
    features, _ = encoder.apply(variables, images.astype(np.float32) / 65535.0, train=False)
    probs = 1 / (1 + np.exp(-(np.asarray(features) @ head["kernel"] + head["bias"])))
    np.testing.assert_allclose(probs, run.probs, atol=2e-5)


def test_pos_weight_comes_from_the_train_records_of_each_fraction(ssl_run, phantom_cache):
    workdir = ssl_run["workdir"]
    store = Store(phantoms.ensure_phantom_store(phantom_cache, num_patients=64, image_size=32, seed=0))
    splits = splits_lib.load(os.path.join(workdir, "splits.json"))
    expected, _ = finetune.pos_weight_for(store.labels[splits.train], store.label_names)
    np.testing.assert_allclose(ssl_run["summary"]["extra"]["pos_weight"], expected, rtol=1e-6)
    everything, _ = finetune.pos_weight_for(store.labels, store.label_names)
    assert not np.allclose(expected, everything)
    half = ssl_run["record"]["fractions"][0]["pos_weight"]
    np.testing.assert_allclose(half, finetune.pos_weight_for(store.labels[splits.fraction_ids(0.5)],
                                                             store.label_names)[0], rtol=1e-6)


def test_distribution_shift_eval_has_the_other_stores_fingerprint(ssl_run):
    shift = records.read_eval(os.path.join(ssl_run["workdir"], "shift"))
    assert shift.store_fingerprint == records.store_fingerprint(ssl_run["shift_store"])
    assert shift.label_names == list(phantoms.LABEL_NAMES) and shift.summary["mode"] == "eval"
    assert len(shift.record_ids) == len(Store(ssl_run["shift_store"]).ids("test"))


def test_selection_reads_validation_only(tmp_path, phantom_cache):
    """Two MedMNIST-layout stores with the same images and labels except the test labels: every grid score
    and choice is the same, the test AUC is not."""
    from test_medmnist import make_npz

    from medssl_jax.data import medmnist

    first = make_npz(tmp_path / "a.npz", size=28, seed=3)
    with np.load(first) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["test_labels"] = 1 - arrays["test_labels"]
    second = str(tmp_path / "b.npz")
    np.savez(second, **arrays)
    runs = []
    for name, npz in (("a", first), ("b", second)):
        medmnist.write_store(npz, str(tmp_path / f"store_{name}"))
        config = ft_config(phantom_cache, "random", lr_grid=(0.03, 0.3), image_size=24)
        config.data.store = str(tmp_path / f"store_{name}")
        summary = main.run(config, str(tmp_path / name))
        with open(tmp_path / name / "finetune.json") as f:
            runs.append((summary, json.load(f)["fractions"][0]))
    (sa, ra), (sb, rb) = runs
    assert [g["score"] for g in ra["grid"]] == [g["score"] for g in rb["grid"]]
    assert ra["chosen"] == rb["chosen"]
    assert sa["mean_auc"] == pytest.approx(1 - sb["mean_auc"], abs=1e-6)  # the same predictions, flipped labels


def test_interrupted_fine_tune_with_weight_averaging_resumes_to_the_same_final_weights(phantom_cache, tmp_path):
    """The average is part of the checkpoint, and it is the model kept (without it: the real-process test
    below)."""
    config = ft_config(phantom_cache, "random", checkpoint_every=3, ema_decay=0.5)
    main.run(config, str(tmp_path / "whole"))
    assert finetune.run(config, str(tmp_path / "cut"), stop_after=4) is None  # killed after 4 of 6 steps
    assert not os.path.exists(tmp_path / "cut" / "eval")
    main.run(config, str(tmp_path / "cut"))  # the same command again: resumes from step 3's checkpoint
    whole = finetune.load_model(str(tmp_path / "whole" / "export"))
    cut = finetune.load_model(str(tmp_path / "cut" / "export"))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(cut)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "cut" / "runs" / "f1" / "lr0.1_steps6" / "seed0" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if "val_mean_auc" in line]
    assert steps == [2, 4, 6]  # every evaluation once


def _wait_for(process, ready, what, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def test_a_fine_tune_killed_then_preempted_resumes_to_the_uninterrupted_result(phantom_cache, tmp_path):
    """The user's command as real processes: kill -9 mid-run, rerun, SIGTERM, rerun; the same model, curve
    and choice as one uninterrupted run."""
    overrides = {"init": "random", "data.cache_dir": phantom_cache, "data.phantom_patients": 64,
                 "data.phantom_size": 32, "image_size": 24, "model.base_width": 4, "batch_size": 16,
                 "label_fractions": (1.0,), "lr_grid": (0.1,), "budget_grid": (160,), "eval_every": 10,
                 "log_every": 10, "checkpoint_every": 20, "seeds": 1, "seed_top_k": 1,
                 "augment_grid": ("full",)}
    whole = str(tmp_path / "whole")
    main.run(set_fields(config_lib.load_config("finetune", "runlocal"), overrides), whole)

    workdir = tmp_path / "cut"
    command = [sys.executable, "-m", "medssl_jax.main", "--config=configs/finetune.py:runlocal",
               f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    run_dir = workdir / "runs" / "f1" / "lr0.1_steps160" / "seed0"

    def checkpoints():  # the verified ones: a checkpoint is complete once its checksums are written
        return sorted(int(p.parent.name) for p in (run_dir / "checkpoints").glob(f"*/{checkpoint.CHECKSUM_FILE}")
                      if p.parent.name.isdigit())

    def evaluated_steps():
        if not (run_dir / "metrics.jsonl").exists():
            return []
        with open(run_dir / "metrics.jsonl") as f:
            return [json.loads(line)["step"] for line in f.read().splitlines() if "val_mean_auc" in line]

    def start(log):  # stdout to a file: the test reads the progress lines while the process runs
        with open(tmp_path / log, "w") as out:
            return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True)

    process = start("killed.log")
    _wait_for(process, lambda: checkpoints(), "first checkpoint")
    process.kill()  # kill -9: no handler runs
    process.communicate(timeout=60)
    killed_at = checkpoints()[-1]
    assert killed_at < 160

    process = start("preempted.log")
    log = tmp_path / "preempted.log"
    # SIGTERM once the restarted loop has evaluated a step it had not reached when it was killed
    _wait_for(process, lambda: f"(step {killed_at}, checksums verified)" in log.read_text()
              and f"step {killed_at + 10}: val_mean_auc" in log.read_text(), "evaluation after the restart")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved checkpoint at step" in log.read_text(), log.read_text()[-2000:]
    assert not (workdir / "eval").exists()

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert evaluated_steps() == list(range(10, 161, 10))  # every evaluation once, none lost to the kill
    for a, b in zip(jax.tree.leaves(finetune.load_model(os.path.join(whole, "export"))),
                    jax.tree.leaves(finetune.load_model(str(workdir / "export")))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with open(os.path.join(whole, "finetune.json")) as f, open(workdir / "finetune.json") as g:
        expected, got = json.load(f)["fractions"][0], json.load(g)["fractions"][0]
    assert got["chosen"] == expected["chosen"]
    assert got["grid"][0]["score"] == pytest.approx(expected["grid"][0]["score"], abs=1e-6)


def test_a_fraction_smaller_than_the_batch_trains_with_a_smaller_batch(phantom_cache, tmp_path):
    config = ft_config(phantom_cache, "random", label_fractions=(0.2, 1.0), batch_size=32)
    main.run(config, str(tmp_path / "e"))
    with open(tmp_path / "e" / "finetune.json") as f:
        small = json.load(f)["fractions"][0]
    assert small["num_train"] < 32 and small["batch_size"] == small["num_train"] - small["num_train"] % 8
    assert finetune.fitted_batch(32, 100, 8) == 32
    with pytest.raises(finetune.FinetuneError, match="cannot fill a batch"):
        finetune.fitted_batch(32, 7, 8)


def test_grid_per_init_and_layer_wise_decay_factors():
    config = finetune.reference_config()
    config.lr_grid, config.budget_grid = (0.01, 0.1), (100,)
    assert [s.name for s in finetune.grid(config, pretrained=False, is_vit=False, budgets=[100])] == [
        "lr0.01_steps100", "lr0.1_steps100"]
    resnet = finetune.grid(config, pretrained=True, is_vit=False, budgets=[100])
    assert {s.backbone_lr_mult for s in resnet} == {1.0, 0.1} and len(resnet) == 4
    vit = finetune.grid(config, pretrained=True, is_vit=True, budgets=[100, 200])
    assert {s.layer_decay for s in vit} == {1.0, 0.75} and len(vit) == 8
    assert finetune.choose({"a": 0.5, "b": 0.7, "c": 0.7}, ["a", "b", "c"]) == "b"  # ties: grid order
    # LP-FT settings: for a pretrained encoder only, one lr for the whole network, after the other settings.
    config.probe_head_lr_grid = (0.001,)
    assert len(finetune.grid(config, pretrained=False, is_vit=False, budgets=[100])) == 2
    lpft = finetune.grid(config, pretrained=True, is_vit=False, budgets=[100])[4:]
    assert [(s.name, s.head, s.backbone_lr_mult) for s in lpft] == [("lr0.001_steps100_lpft", "probe", 1.0)]
    # Successive halving: the top k of one budget (failed runs never) move to the next, in grid order.
    short = finetune.grid(config, pretrained=True, is_vit=False, budgets=[100])
    scores = {"lr0.01_steps100": 0.7, "lr0.01_steps100_bb0.1": -np.inf, "lr0.1_steps100": 0.8,
              "lr0.1_steps100_bb0.1": 0.6, "lr0.001_steps100_lpft": 0.7}
    assert [s.name for s in finetune.promoted(short, scores, budget=300, top_k=2)] == [
        "lr0.01_steps300", "lr0.1_steps300"]  # the tie at 0.7 goes to the earlier setting
    assert [s.name for s in finetune.promoted(short, scores, budget=300, top_k=9)] == [
        "lr0.01_steps300", "lr0.1_steps300", "lr0.1_steps300_bb0.1", "lr0.001_steps300_lpft"]
    # Augmentation strengths: every setting once per strength, the configured ('full') ones first.
    config.augment_grid = ("full", "flip")
    both = finetune.grid(config, pretrained=True, is_vit=False, budgets=[100])
    assert [s.name for s in both] == [s.name for s in short] + [s.name + "_flip" for s in short]
    assert [s.augment for s in both] == ["full"] * 5 + ["flip"] * 5
    # halving promotes the best k of each strength (a strength can be behind at the short budget only)
    flip_scores = {**scores, **{name + "_flip": score - 0.5 for name, score in scores.items()}}
    assert [s.name for s in finetune.promoted(both, flip_scores, budget=300, top_k=2)] == [
        "lr0.01_steps300", "lr0.1_steps300", "lr0.01_steps300_flip", "lr0.1_steps300_flip"]
    config.augment_grid = ("full", "strong")
    with pytest.raises(ValueError, match="augment_grid"):
        finetune.validate(config)

    params = {"encoder": {"patch_embed": {"kernel": 0}, "cls_token": 0, "pos_embed": 0,
                          "block_0": {"attn": {"qkv": {"kernel": 0}}}, "block_1": {"mlp": {"fc1": {"bias": 0}}},
                          "block_2": {"ls1": 0}, "norm": {"scale": 0}},
              "head": {"dense": {"kernel": 0}}}
    factors = optim.lr_multipliers(params, layer_decay=0.5, backbone_mult=0.1)
    assert factors["head"]["dense"]["kernel"] == 1.0
    assert factors["encoder"]["norm"]["scale"] == pytest.approx(0.1)  # layer L + 1: decay ** 0
    assert factors["encoder"]["block_2"]["ls1"] == pytest.approx(0.1 * 0.5)
    assert factors["encoder"]["block_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.1 * 0.5 ** 3)
    assert factors["encoder"]["patch_embed"]["kernel"] == pytest.approx(0.1 * 0.5 ** 4)
    assert factors["encoder"]["cls_token"] == factors["encoder"]["pos_embed"] == pytest.approx(0.1 * 0.5 ** 4)
    resnet_factors = optim.lr_multipliers({"encoder": {"stem": {"conv": 0}}, "head": {"b": 0}}, backbone_mult=0.1)
    assert resnet_factors == {"encoder": {"stem": {"conv": 0.1}}, "head": {"b": 1.0}}


def test_lpft_head_is_the_fractions_linear_probe_chosen_on_validation(phantom_cache, tmp_path):
    """The LP-FT settings start from the linear probe of the fraction's train images (C chosen on
    validation), folded into the head: checked against scikit-learn on features computed here."""
    from medssl_jax.data import sources
    from medssl_jax.evaluate import probe

    export = tiny_export(tmp_path / "run" / "export", seed=2)
    config = ft_config(phantom_cache, export, budget_grid=(2,), lr_grid=(1e-12,), probe_head_lr_grid=(1e-12,))
    workdir = str(tmp_path / "lpft")
    main.run(config, workdir)
    with open(os.path.join(workdir, "finetune.json")) as f:
        record = json.load(f)["fractions"][0]
    assert [g["name"] for g in record["grid"]] == ["lr1e-12_steps2", "lr1e-12_steps2_lpft"]
    with np.load(os.path.join(workdir, "fractions", "f1", "probe_head.npz")) as f:
        kernel, bias, c = f["kernel"], f["bias"], float(f["c"])
    assert record["probe_head"]["c"] == c
    # A vanishing lr leaves the LP-FT run's head where it started.
    with np.load(os.path.join(workdir, "runs", "f1", "lr1e-12_steps2_lpft", "seed0", "model", "head.npz")) as f:
        np.testing.assert_allclose(f["kernel"], kernel, atol=1e-6)
        np.testing.assert_allclose(f["bias"], bias, atol=1e-6)

    # Reference: pooled features of the export (eval mode), scikit-learn's probe per C, picked on validation.
    store = sources.open_store(config.data)
    splits = splits_lib.load(os.path.join(workdir, splits_lib.SPLITS_FILE))
    variables, meta = checkpoint.load_export(export)
    encoder = models.build_encoder({**meta["model"], "dtype": "float32"})

    def feats(ids):
        images, labels = features_lib.load_images(store, ids, image_size=24, batch_size=64)
        return np.asarray(encoder.apply(variables, images.astype(np.float32) / 65535.0, train=False)[0]), labels

    (x_train, y_train), (x_val, y_val) = feats(splits.fraction_ids(1.0)), feats(splits.val)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    by_c = {}
    for grid_c in probe.C_GRID:
        fitted = probe.fit_probe(x_train, y_train, grid_c, mean=mean, std=std)
        by_c[grid_c] = np.nanmean([_auc(y_val[:, j], fitted.predict(x_val)[:, j]) for j in range(y_val.shape[1])])
    assert c == max(probe.C_GRID, key=lambda k: (by_c[k], -k))
    reference = probe.fit_probe(x_train, y_train, c, mean=mean, std=std)
    folded_kernel, folded_bias = reference.as_dense()  # the folding is exact
    np.testing.assert_allclose(x_val @ folded_kernel + folded_bias, reference.logits(x_val), rtol=1e-4, atol=1e-3)
    # The study's head predicts like the reference probe (lbfgs on features of another batch layout lands
    # on a slightly different optimum of this ill-conditioned tiny problem: compare probabilities).
    np.testing.assert_allclose(jax.nn.sigmoid(x_val @ kernel + bias), reference.predict(x_val), atol=0.02)

    config.init_head = True
    with pytest.raises(ValueError, match="probe_head_lr_grid"):
        main.run(config, str(tmp_path / "both"))


def _auc(labels, scores):
    keep = ~np.isnan(labels)
    labels, scores = labels[keep], scores[keep]
    if len(np.unique(labels)) < 2:
        return np.nan
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


def test_runtime_schedule_is_optax_warmup_cosine_and_scales_each_parameter():
    expected = optax.warmup_cosine_decay_schedule(0.0, 0.3, 10, 100, 0.0)
    for step in (0, 5, 10, 11, 50, 99, 100, 150):
        assert float(optim.warmup_cosine(step, peak=0.3, warmup=10, total=100)) == pytest.approx(
            float(expected(step)), rel=1e-5, abs=1e-7)
    cfg = optim.default_config("sgd")
    cfg.momentum, cfg.weight_decay = 0.0, 0.0
    params = {"encoder": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    tx = optim.make_finetune_optimizer(cfg, peak_lr=0.5, warmup_steps=0, total_steps=10,
                                       multiplier_fn=lambda p: optim.lr_multipliers(p, backbone_mult=0.1))
    grads = {"encoder": {"w": jnp.full(3, 2.0)}, "head": {"w": jnp.full(3, 2.0)}}
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["w"], -0.5 * 2.0)  # plain SGD at step 0 of the cosine: -lr g
    np.testing.assert_allclose(updates["encoder"]["w"], -0.05 * 2.0)
    assert float(optim.lr_of(state, None, 1)) == pytest.approx(float(optim.warmup_cosine(1, peak=0.5, warmup=0,
                                                                                        total=10)))


def test_the_runs_of_a_study_share_one_compiled_init_and_step(phantom_cache, tmp_path):
    """lr, budget, backbone lr, seed, pos_weight and an LP-FT head are data of the compiled init and step,
    not constants in them: the runs of a study reuse one traced init and step (train.setup), each run's
    state holds its own values, and a changed architecture or augmentation gets programs of its own."""
    config = ft_config(phantom_cache, tiny_export(tmp_path / "export"))
    _, ctx, _, _ = finetune.open_context(config, str(tmp_path / "eval"))
    ids = ctx.splits.fraction_ids(1.0)
    num_labels = len(ctx.store.label_names)
    head_file = str(tmp_path / "head.npz")
    np.savez(head_file, kernel=np.full((8, num_labels), 0.25, np.float32), bias=np.full(num_labels, -1.0, np.float32))
    train._JITTED.clear()
    programs, heads, steps = [], [], []
    for setting, seed, weight, head in ((finetune.Setting(0.1, 6), 0, 1.0, None),
                                        (finetune.Setting(0.3, 10, 0.1), 2, 3.0, None),
                                        (finetune.Setting(0.01, 6, head="probe"), 1, 2.0, head_file)):
        pos_weight = weight * np.arange(1, num_labels + 1, dtype=np.float32)
        cfg = finetune.run_config(ctx, setting, seed=seed, batch_size=16, pos_weight=pos_weight, warmup=2,
                                  head_init=head)
        run = train.setup(cfg, store=ctx.store, ids=ids)
        steps.append(run.train_step)
        state = train._init_encoder_from(run.fresh_state(), cfg.init, run)
        batch = sharding.to_global(next(run.data_iter), run.mesh)
        programs.append([run.init_state.lower(sharding.to_global(run.example, run.mesh), run.init_inputs).as_text(),
                         run.init_optimizer.lower(state["params"], run.init_inputs).as_text(),
                         run.train_step.lower(run.abstract_state, batch).as_text()])
        schedule = optim.find_runtime_schedule(state["opt_state"])
        assert float(schedule.peak_lr) == pytest.approx(cfg.supervised.peak_lr)
        assert (float(schedule.warmup_steps), float(schedule.total_steps)) == (2.0, setting.budget)
        multipliers = jax.device_get(schedule.multipliers)
        assert {float(m) for m in jax.tree.leaves(multipliers["encoder"])} == {np.float32(setting.backbone_lr_mult)}
        assert {float(m) for m in jax.tree.leaves(multipliers["head"])} == {1.0}
        np.testing.assert_array_equal(state["method_state"]["pos_weight"], pos_weight)
        assert int(state["method_state"]["seed"]) == seed
        heads.append(np.asarray(state["params"]["head"]["dense"]["kernel"]))
    assert programs[0] == programs[1]
    assert programs[2][2] == programs[0][2]  # the LP-FT head is one more argument of the inits only
    assert not np.array_equal(heads[0], heads[1])  # the seed reaches the head's init
    np.testing.assert_array_equal(heads[2], 0.25)
    assert steps[0] is steps[1] is steps[2] and len(train._JITTED) == 1
    # 'flip': the whole image, only flipped (no random-resized crop, every device augmentation off); its own program.
    cfg = finetune.run_config(ctx, finetune.Setting(0.1, 6, augment="flip"), seed=0, batch_size=16,
                              pos_weight=np.ones(num_labels, np.float32), warmup=2)
    assert tuple(cfg.data.crop_scale) == tuple(cfg.data.crop_ratio) == (1.0, 1.0) and cfg.data.flip
    assert all(cfg.augment[k] == 0 for k in cfg.augment if k.endswith("_p"))
    assert train.setup(cfg, store=ctx.store, ids=ids).train_step is not steps[0]
    for change in ({"flip": False}, {"augment": {**config.augment.to_dict(), "brightness": 0.1}}):
        other = ft_config(phantom_cache, config.init, **change)
        _, other_ctx, _, _ = finetune.open_context(other, str(tmp_path / "eval"))
        cfg = finetune.run_config(other_ctx, finetune.Setting(0.1, 6), seed=0, batch_size=16,
                                  pos_weight=np.ones(num_labels, np.float32), warmup=2)
        assert train.setup(cfg, store=other_ctx.store, ids=ids).train_step is not steps[0], change


def test_weight_average_follows_a_numpy_recursion_from_the_restored_weights(phantom_cache, tmp_path):
    """ema_decay > 0: the average starts at the weights after step 0's update (the export's encoder, not the
    random one it replaced), then e = d e + (1 - d) w with d = min(decay, (1 + step) / (10 + step)), for the
    weights and BatchNorm's statistics alike; it is what the run evaluates and keeps."""
    decay = 0.2
    config = ft_config(phantom_cache, tiny_export(tmp_path / "export"), ema_decay=decay)
    _, ctx, _, _ = finetune.open_context(config, str(tmp_path / "eval"))
    cfg = finetune.run_config(ctx, finetune.Setting(0.3, 6), seed=0, batch_size=16,
                              pos_weight=np.ones(len(ctx.store.label_names), np.float32), warmup=0)
    run = train.setup(cfg, store=ctx.store, ids=ctx.splits.fraction_ids(1.0))
    state = train._init_encoder_from(run.fresh_state(), cfg.init, run)
    seen = []
    for _ in range(4):
        state, _ = run.train_step(state, sharding.to_global(next(run.data_iter), run.mesh))
        seen.append(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]}))
    expected = seen[0]
    for step in (1, 2, 3):
        d = min(decay, (1 + step) / (10 + step))
        expected = jax.tree.map(lambda e, w: d * e + (1 - d) * w, expected, seen[step])
    ema = jax.device_get(state["method_state"]["ema"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ema, expected)
    assert not np.allclose(ema["params"]["head"]["dense"]["kernel"], seen[-1]["params"]["head"]["dense"]["kernel"])
    kept = supervised.export_variables(seen[-1], state["method_state"])
    jax.tree.map(np.testing.assert_array_equal, kept, ema)


def test_finalists_are_the_best_grid_scores_and_a_seed_that_failed_rules_a_finalist_out():
    scores = {"a": 0.7, "b": 0.9, "c": -np.inf, "d": 0.9, "e": 0.8}
    assert finetune.finalists(scores, list(scores), 2) == ["b", "d"]  # ties: grid order
    assert finetune.finalists(scores, list(scores), 9) == ["b", "d", "e", "a"]  # a failed run never
    assert finetune.seed_mean_score([0.9, 0.7, 0.8]) == pytest.approx(0.8)
    assert finetune.seed_mean_score([0.95, -np.inf, 0.9]) == -np.inf
    final = {"b": finetune.seed_mean_score([0.9, 0.7, 0.71]), "d": finetune.seed_mean_score([0.9, 0.8, 0.8])}
    assert finetune.choose(final, ["b", "d"]) == "d"  # b's grid score was its lucky seed


def test_runs_stored_before_a_config_field_existed_are_read_back_under_its_old_behaviour():
    stored = {"optim.weight_decay": 0.0}  # a run written before supervised.ema_decay existed
    finetune.check_same_run(stored, {**stored, "supervised.ema_decay": 0.0}, "run")
    with pytest.raises(finetune.FinetuneError, match=r"supervised\.ema_decay: 0\.0 there, 0\.9 now"):
        finetune.check_same_run(stored, {**stored, "supervised.ema_decay": 0.9}, "run")
    # a random-init run written before model.cifar_stem existed trained with the 7x7 stem
    finetune.check_same_run(stored, {**stored, "model.cifar_stem": False}, "run")
    finetune.check_same_run(stored, stored, "run")  # an older export's model config has no cifar_stem either
    with pytest.raises(finetune.FinetuneError, match=r"model\.cifar_stem: False there, True now"):
        finetune.check_same_run(stored, {**stored, "model.cifar_stem": True}, "run")


def test_a_run_with_a_reused_step_trains_like_one_compiled_for_it(phantom_cache, tmp_path):
    """Reusing an earlier run's jitted init and step changes nothing a run computes: the same run after
    another (different lr, budget, seed, pos_weight) ends with the same weights as in a fresh process."""
    config = ft_config(phantom_cache, tiny_export(tmp_path / "export"))
    _, ctx, _, _ = finetune.open_context(config, str(tmp_path / "eval"))
    ids = ctx.splits.fraction_ids(1.0)
    weights = np.ones(len(ctx.store.label_names), np.float32)

    def train_b(run_dir):
        finetune.train_run(ctx, finetune.Setting(0.3, 6, 0.1), seed=1, train_ids=ids, run_dir=run_dir,
                           batch_size=16, pos_weight=2 * weights)
        return finetune.load_model(os.path.join(run_dir, "model"))

    train._JITTED.clear()
    alone = train_b(str(tmp_path / "alone"))
    finetune.train_run(ctx, finetune.Setting(0.03, 4), seed=0, train_ids=ids, run_dir=str(tmp_path / "a"),
                       batch_size=16, pos_weight=weights)
    assert len(train._JITTED) == 1
    after = train_b(str(tmp_path / "after"))
    assert len(train._JITTED) == 1
    jax.tree.map(np.testing.assert_array_equal, alone, after)


def test_runtime_schedule_inputs_give_lr_multipliers_factors():
    """The factors the compiled init writes (`with_runtime_schedule`) are `lr_multipliers`'s, bit for bit."""
    params = {"encoder": {"patch_embed": {"kernel": jnp.zeros(2)}, "block_0": {"w": jnp.zeros(2)},
                          "block_1": {"w": jnp.zeros(2)}, "norm": {"scale": jnp.zeros(2)}},
              "head": {"dense": {"kernel": jnp.zeros(2)}}}
    tx = optim.make_finetune_optimizer(optim.default_config("sgd"), peak_lr=1.0, warmup_steps=0, total_steps=1)
    inputs = optim.runtime_schedule_inputs(peak_lr=0.2, warmup_steps=3, total_steps=30, backbone_mult=0.1,
                                           layer_decay=0.65)
    state = jax.jit(lambda p, i: optim.with_runtime_schedule(tx.init(p), p, i))(params, inputs)
    got = jax.device_get(optim.find_runtime_schedule(state).multipliers)
    want = optim.lr_multipliers(params, backbone_mult=0.1, layer_decay=0.65)
    assert jax.tree.map(lambda g, w: bool(np.float32(g) == np.float32(w)), got, want) == jax.tree.map(
        lambda _: True, want)
    with pytest.raises(ValueError, match="warmup_steps=40"):
        optim.runtime_schedule_inputs(peak_lr=0.2, warmup_steps=40, total_steps=30)


def test_seed_and_image_bootstrap_matches_a_numpy_reference():
    from sklearn.metrics import roc_auc_score
    import scipy.stats

    rng = np.random.default_rng(0)
    n, num_labels = 40, 2
    labels = rng.integers(0, 2, (n, num_labels)).astype(np.float64)
    labels[3, 1] = np.nan
    probs_a = np.clip(labels[None] * 0.3 + rng.random((3, n, num_labels)), 0, 1)
    probs_b = rng.random((2, n, num_labels))
    res = bootstrap.seed_and_image_bootstrap(probs_a=probs_a, probs_b=probs_b, labels=labels, num_resamples=60, seed=4)

    def mean_auc(p, rows):
        values = []
        for j in range(num_labels):
            y, s = labels[rows, j], p[rows, j]
            keep = ~np.isnan(y)
            if len(np.unique(y[keep])) == 2:
                values.append(roc_auc_score(y[keep], s[keep]))
        return np.mean(values) if values else np.nan

    indices = np.random.default_rng(4).integers(0, n, size=(60, n))
    draws_a = np.random.default_rng([4, 1]).integers(0, 3, size=(60, 3))
    draws_b = np.random.default_rng([4, 2]).integers(0, 2, size=(60, 2))
    rep_a = np.array([np.mean([mean_auc(probs_a[s], indices[b]) for s in draws_a[b]]) for b in range(60)])
    rep_b = np.array([np.mean([mean_auc(probs_b[s], indices[b]) for s in draws_b[b]]) for b in range(60)])
    diff = rep_a - rep_b
    all_rows = np.arange(n)
    point = np.mean([mean_auc(p, all_rows) for p in probs_a]) - np.mean([mean_auc(p, all_rows) for p in probs_b])
    assert res["diff"]["point"] == pytest.approx(point)
    assert [res["diff"]["ci_low"], res["diff"]["ci_high"]] == pytest.approx(np.percentile(diff, [2.5, 97.5]))
    assert res["p_a_not_better"] == pytest.approx(np.mean(rep_a <= rep_b))
    assert res["a"]["ci_low"] == pytest.approx(np.percentile(rep_a, 2.5))
    assert res["num_seeds"] == [3, 2]

    # Per label, on the same image and seed draws: each label's AUC averaged over the drawn seeds.
    def label_auc(p, rows, j):
        y, s = labels[rows, j], p[rows, j]
        keep = ~np.isnan(y)
        return roc_auc_score(y[keep], s[keep]) if len(np.unique(y[keep])) == 2 else np.nan

    p_values = []
    for j, entry in enumerate(res["per_label"]):
        lab_a = np.array([np.mean([label_auc(probs_a[s], indices[b], j) for s in draws_a[b]]) for b in range(60)])
        lab_b = np.array([np.mean([label_auc(probs_b[s], indices[b], j) for s in draws_b[b]]) for b in range(60)])
        point_j = (np.mean([label_auc(p, all_rows, j) for p in probs_a])
                   - np.mean([label_auc(p, all_rows, j) for p in probs_b]))
        assert entry["diff"]["point"] == pytest.approx(point_j)
        assert [entry["diff"]["ci_low"], entry["diff"]["ci_high"]] == pytest.approx(
            np.nanpercentile(lab_a - lab_b, [2.5, 97.5]))
        assert entry["a"]["point"] == pytest.approx(np.mean([label_auc(p, all_rows, j) for p in probs_a]))
        ok = ~np.isnan(lab_a - lab_b)
        assert entry["p_a_not_better"] == pytest.approx(np.mean(lab_a[ok] <= lab_b[ok]))
        p_values.append(entry["p_a_not_better"])
    assert [e["p_a_not_better_bh"] for e in res["per_label"]] == pytest.approx(
        scipy.stats.false_discovery_control(p_values, method="bh"))


def test_transfer_study_end_to_end(phantom_cache, tmp_path):
    """Two inits, both arms, two fractions: transfer.json, report.md and the plots; rerunning reads back."""
    export = tiny_export(tmp_path / "run" / "export", seed=3)
    config = transfer.reference_config()
    config.inits = (export, "random")
    config.label_fractions = (0.5, 1.0)
    config.num_resamples = 50
    config.model = dict(TINY_RESNET)
    config.image_size = 24
    config.data.update(cache_dir=phantom_cache, phantom_patients=64, phantom_size=32)
    config.finetune = ft_config(phantom_cache, "random", seeds=2)
    config.linear_probe.update(batch_size=32, c_grid=(0.1, 1.0))
    workdir = str(tmp_path / "study")
    result = main.run(config, workdir)
    assert set(result["inits"]) == {"run", "random"}
    ft = [r for r in result["results"] if r["arm"] == "finetune"]
    assert len(ft) == 4 and all(len(r["seeds"]) == 2 and r["chosen"]["name"] for r in ft)
    assert all(r["ci_low"] <= r["mean_auc"] <= r["ci_high"] for r in result["results"])
    rows = [r for r in result["comparisons"] if r["arm"] == "finetune"]
    assert [r["fraction"] for r in rows] == [0.5, 1.0] and rows[0]["num_seeds"] == [2, 2]
    adjusted = bootstrap.benjamini_hochberg([r["p_a_not_better"] for r in rows])
    assert [r["p_a_not_better_bh"] for r in rows] == adjusted
    assert [c["fraction"] for c in result["convergence"]] == [0.5, 1.0]
    # Per label: every init's AUC and every pair's difference for each of the store's labels; the labels'
    # mean is the mean AUC (every label has both classes in this test split).
    labels = result["labels"]
    assert len(labels) == 4
    for r in result["results"]:
        assert list(r["per_label"]) == labels
        assert np.mean([e["mean_auc"] for e in r["per_label"].values()]) == pytest.approx(r["mean_auc"])
    for r in result["comparisons"]:
        diffs = [e["diff"] for e in r["per_label"].values()]
        assert np.mean(diffs) == pytest.approx(r["diff"])
        assert [e["p_a_not_better_bh"] for e in r["per_label"].values()] == bootstrap.benjamini_hochberg(
            [e["p_a_not_better"] for e in r["per_label"].values()])
    for name in ("transfer.json", "report.md", "label_efficiency.png", "convergence.png"):
        assert os.path.exists(os.path.join(workdir, name))
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    assert "| finetune | run | random | 0.5 |" in report
    assert f"| finetune | 0.5 | {labels[0]} |" in report
    # Both one-sided directions are reported: an init significantly behind reads "random better", not p = 1.
    flipped = json.loads(json.dumps(result))
    first = flipped["comparisons"][0]
    first.update(p_a_not_better_bh=1.0, p_b_not_better_bh=0.01)
    first["per_label"][labels[0]].update(p_a_not_better_bh=0.02, p_b_not_better_bh=1.0)
    lines = transfer.markdown(flipped, []).splitlines()
    arm, fraction = first["arm"], f"{first['fraction']:g}"
    rows = [[x.strip() for x in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    diff_row, = [c for c in rows if c[:4] == [arm, "run", "random", fraction]]
    label_row, = [c for c in rows if c[:3] == [arm, fraction, labels[0]]]
    assert [diff_row[i] for i in (6, 8, 9)] == ["1.000", "0.010", "random better"]
    assert label_row[6:9] == ["0.020", "1.000", "run better"]
    # Each markdown table renders: every row has its header's number of cells, a convergence note included.
    noted = json.loads(json.dumps(result))
    noted["convergence"][0]["note"] = "SSL run never reached the random-init best validation AUC 0.9"
    for text in (report, transfer.markdown(noted, [])):
        tables = _markdown_tables(text)
        assert len(tables) >= 3 and all(len(set(t)) == 1 for t in tables), tables
    # The same command again: every evaluation is read back, the analysis is the same.
    again = main.run(config, workdir)
    assert again["comparisons"] == result["comparisons"]
    # A changed protocol is not "done earlier": the arm is evaluated again under the new config.
    out = os.path.join(workdir, "finetune", "random")
    assert transfer._done(out, "finetune", [0.5, 1.0], transfer.arm_config(config, "finetune", "random"))
    wider = transfer.reference_config()
    wider.update(config.to_dict())
    wider.finetune.lr_grid = (0.1, 0.3)
    assert not transfer._done(out, "finetune", [0.5, 1.0], transfer.arm_config(wider, "finetune", "random"))


def test_a_validation_only_study_never_predicts_test_then_reads_it_once_reusing_every_run(phantom_cache, tmp_path,
                                                                                        monkeypatch):
    """read_test=False: the choices and their validation scores, and no test prediction anywhere; the same
    study with read_test=True trains nothing new, makes the same choices and adds the test AUCs."""
    export = tiny_export(tmp_path / "run" / "export", seed=3)
    config = transfer.reference_config()
    config.inits = (export, "random")
    config.label_fractions = (1.0,)
    config.num_resamples = 20
    config.model = dict(TINY_RESNET)
    config.image_size = 24
    config.data.update(cache_dir=phantom_cache, phantom_patients=64, phantom_size=32)
    config.finetune = ft_config(phantom_cache, "random", lr_grid=(0.03, 0.3))
    config.linear_probe.update(batch_size=32, c_grid=(0.1, 1.0))
    config.read_test = False
    workdir = str(tmp_path / "study")
    predicted, feature_roles = [], []  # whether a fine-tuned model predicted test records; splits probes read
    real_predict, real_features = finetune._predict, linear_probe.features_of

    def predict(ctx, variables, ids, store=None):
        predicted.append(bool(set(map(int, ids)) & set(map(int, ctx.splits.test))))
        return real_predict(ctx, variables, ids, store)

    def features_of(*args, roles=("train", "test", "val"), **kwargs):
        feature_roles.extend(roles)
        return real_features(*args, roles=roles, **kwargs)

    monkeypatch.setattr(finetune, "_predict", predict)
    monkeypatch.setattr(linear_probe, "features_of", features_of)

    blind = main.run(config, workdir)
    assert blind["read_test"] is False and blind["comparisons"] == []
    assert all(r["mean_auc"] is None and 0 <= r["val_score"] <= 1 for r in blind["results"])
    assert not any(predicted) and "test" not in feature_roles
    written = {os.path.relpath(os.path.join(d, f), workdir): os.path.getmtime(os.path.join(d, f))
               for d, _, files in os.walk(workdir) for f in files}
    assert not [f for f in written if f.endswith("predictions.npz") or f.endswith(os.path.join("eval", "summary.json"))]
    with open(os.path.join(workdir, "report.md")) as f:
        assert "test split was not read" in f.read()
    # The probe's validation record says which findings the features carry, label by label.
    for entry in linear_probe.read_validation_only(os.path.join(workdir, "linear_probe", "run")).values():
        defined = [a for a in entry["val_per_label_auc"].values() if a is not None]
        assert len(entry["val_per_label_auc"]) == 4 and np.mean(defined) == pytest.approx(entry["val_mean_auc"])
    for arm in ("finetune", "linear_probe"):  # compare says why there is nothing to compare yet
        with pytest.raises(records.ReportError, match="validation-only evaluation"):
            records.read_eval(os.path.join(workdir, arm, "random"))
    runs = {f: t for f, t in written.items() if f.endswith(finetune.RESULT_FILE)}
    assert len(runs) == 4  # 2 inits x 2 lrs, one seed

    config.read_test = True
    read = main.run(config, workdir)
    assert any(predicted) and "test" in feature_roles
    assert [(r["init"], r["arm"], r["chosen"]) for r in read["results"]] == [
        (r["init"], r["arm"], r["chosen"]) for r in blind["results"]]
    assert all(0 <= r["mean_auc"] <= 1 for r in read["results"]) and len(read["comparisons"]) == 2
    after = {os.path.relpath(os.path.join(d, f), workdir): os.path.getmtime(os.path.join(d, f))
             for d, _, files in os.walk(workdir) for f in files if f == finetune.RESULT_FILE}
    assert after == runs  # every fine-tuning run read back, none trained again


def _markdown_tables(text: str) -> list[list[int]]:
    """The '|' count of each row, per markdown table (a run of lines starting with '|'); -1 for a row with
    text after its last cell."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.count("|") if line.rstrip().endswith("|") else -1)
        elif current:
            tables, current = tables + [current], []
    return tables


def test_a_rerun_reuses_only_runs_trained_with_the_same_config(phantom_cache, tmp_path):
    """A wider grid in the same workdir trains only the new settings; a run whose config differs from what
    this study would train stops the study with one line naming the field, never silently reused."""
    workdir = str(tmp_path / "e")
    main.run(ft_config(phantom_cache, "random"), workdir)
    first = os.path.join(workdir, "runs", "f1", "lr0.1_steps6", "seed0", finetune.RESULT_FILE)
    written = os.path.getmtime(first)
    main.run(ft_config(phantom_cache, "random", lr_grid=(0.1, 0.3)), workdir)
    assert os.path.getmtime(first) == written  # read back, not retrained
    with open(os.path.join(workdir, "finetune.json")) as f:
        assert [g["name"] for g in json.load(f)["fractions"][0]["grid"]] == ["lr0.1_steps6", "lr0.3_steps6"]
    # Successive halving over budgets: the 6-step runs are read back, and only the better of the two lrs (on
    # validation) trains for 8 steps.
    main.run(ft_config(phantom_cache, "random", lr_grid=(0.1, 0.3), budget_grid=(6, 8), budget_top_k=1,
                       checkpoint_every=8), workdir)
    assert os.path.getmtime(first) == written
    with open(os.path.join(workdir, "finetune.json")) as f:
        halved = json.load(f)["fractions"][0]
    short = {g["name"]: g["score"] for g in halved["grid"] if g["budget"] == 6}
    best_lr = max((0.1, 0.3), key=lambda lr: (short[f"lr{lr:g}_steps6"], -lr))
    assert [g["name"] for g in halved["grid"]] == ["lr0.1_steps6", "lr0.3_steps6", f"lr{best_lr:g}_steps8"]
    assert halved["not_promoted"] == [f"lr{({0.1, 0.3} - {best_lr}).pop():g}_steps8"]
    assert halved["chosen"]["name"] == max(halved["grid"], key=lambda g: g["score"])["name"]
    changed = ft_config(phantom_cache, "random")
    changed.optim.weight_decay = 0.5
    with pytest.raises(finetune.FinetuneError, match=r"lr0\.1_steps6.*another config \(optim\.weight_decay: "):
        finetune.run(changed, workdir)


def test_random_init_vit_and_compare(ssl_run, phantom_cache, tmp_path):
    workdir = str(tmp_path / "random_vit")
    config = ft_config(phantom_cache, "random", budget_grid=(4,), model=dict(TINY_VIT), lr_grid=(1e-3,))
    config.optim.name, config.optim.lr_scaling = "adamw", "none"
    summary = main.run(config, workdir)
    assert summary["init"] == "random" and summary["method"] == "none"
    out = str(tmp_path / "report")
    report.compare_runs([ssl_run["workdir"], workdir], out, num_resamples=50)
    with open(os.path.join(out, "comparison.json")) as f:
        assert json.load(f)["convergence"]  # the SSL run's curve against the random-init run's
    assert_exports_to_pytorch(os.path.join(workdir, "export"), "hf", tmp_path / "hf")


def assert_exports_to_pytorch(export, fmt, out):
    """A fine-tuned model (trained encoder + head) in PyTorch: the same features and logits as ours, the
    labels beside them (python -m medssl_jax.export; tests/test_export_torch.py covers the layouts)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from test_export_torch import torch_features, torch_model

    from medssl_jax import export as export_lib

    export_lib.export(export, fmt, str(out))
    variables, config = checkpoint.load_export(export)
    size = config["input"]["image_size"]
    images = np.random.default_rng(0).uniform(size=(4, size, size, config["input"]["channels"])).astype(np.float32)
    ours = export_lib.our_features(variables, config, images)
    theirs = torch_features(torch_model(str(out), fmt), fmt, images, config)
    assert export_lib.relative_difference(theirs, ours) <= 1e-5
    head = torch.nn.Linear(ours.shape[1], len(config["source"]["label_names"]))
    head.load_state_dict(load_file(os.path.join(out, "head.safetensors")), strict=True)
    with np.load(os.path.join(export, "head.npz")) as saved:
        our_logits = ours @ saved["kernel"] + saved["bias"]
    with torch.no_grad():
        their_logits = head(torch.from_numpy(theirs)).numpy()
    assert export_lib.relative_difference(their_logits, our_logits) <= 1e-5
    with open(os.path.join(out, "labels.json")) as f:
        assert json.load(f) == config["source"]["label_names"]
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "fine-tuned from" in card and "head.safetensors" in card and "fine-tuned on" in card


def test_fine_tuned_resnet_exports_to_torchvision_with_its_head(ssl_run, tmp_path):
    assert_exports_to_pytorch(os.path.join(ssl_run["workdir"], "export"), "torchvision", tmp_path / "tv")


def test_pos_weight_for_masks_missing_and_names_labels_without_positives():
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [0, np.nan, 0], [np.nan, 0, 0]], np.float32)
    weight, empty = finetune.pos_weight_for(labels, ["a", "b", "c"])
    np.testing.assert_allclose(weight, [2.0, 1.0, 2.0])
    assert empty == ["b"]


def test_bad_inputs_fail_before_training(phantom_cache, tmp_path):
    config = ft_config(phantom_cache, "random", shift_store=str(
        phantoms.ensure_phantom_store(phantom_cache, num_patients=16, image_size=32, seed=5)),
        label_map=(("Effusion", "effusion"),))
    with pytest.raises(ValueError, match="'Effusion' is not a store label") as error:
        main.run(config, str(tmp_path / "e"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(str(tmp_path / "e" / "eval"))
    for field, value, message in (("lr_grid", (), "lr_grid"), ("seeds", 0, "seeds"), ("budget_grid", (0,), "budget"),
                                  ("layer_decays", (1.5,), "layer_decays"), ("budget_top_k", -1, "budget_top_k"),
                                  ("ema_decay", 1.0, "ema_decay"), ("seed_top_k", 0, "seed_top_k")):
        with pytest.raises(ValueError, match=message):
            main.run(ft_config(phantom_cache, "random", **{field: value}), str(tmp_path / "bad"))
    # Robustness and the shift store evaluate test images: refused when the test split is not to be read.
    with pytest.raises(ValueError, match=r"config.robustness=True: .* needs config.read_test=True"):
        main.run(ft_config(phantom_cache, "random", robustness=True, read_test=False), str(tmp_path / "bad"))
    study = transfer.reference_config()
    study.inits = ("random", "random")
    study.model = dict(TINY_RESNET)
    with pytest.raises(ValueError, match="duplicates"):
        main.run(study, str(tmp_path / "study"))


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
    config.update(image_size=24, batch_size=16, budget_grid=(2,), eval_every=2, log_every=2, lr_grid=(1e-12,),
                  layer_decays=(1.0,), seeds=1)
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
    config = ft_config(phantom_cache, "random", budget_grid=(4,), task="multi_class")
    config.data.store = store_path
    runs = [str(tmp_path / "run")]
    summary = main.run(config, runs[0])
    assert summary["metrics"]["top1_accuracy"] == summary["top1_accuracy"] and 0 <= summary["top1_accuracy"] <= 1
    run = records.read_eval(runs[0])
    np.testing.assert_allclose(run.probs.sum(axis=1), 1.0, rtol=1e-5)  # softmax over the 7 classes
    correct = np.argmax(run.probs, axis=1) == np.argmax(run.labels, axis=1)
    assert run.summary["top1_accuracy"] == pytest.approx(correct.mean())
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
    assert "top1_accuracy" in comparison["bootstrap"]["comparisons"][0]
    # A multi-label store is refused in one line before any training.
    config = ft_config(phantom_cache, "random", task="multi_class")
    with pytest.raises(ValueError, match="config.task='multi_class' needs one-hot labels") as error:
        main.run(config, str(tmp_path / "bad"))
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "bad" / "eval")


def test_a_diverging_grid_point_is_recorded_and_not_chosen(phantom_cache, tmp_path):
    config = ft_config(phantom_cache, "random", lr_grid=(0.1, 1e12))
    summary = main.run(config, str(tmp_path / "e"))
    with open(tmp_path / "e" / "finetune.json") as f:
        fraction = json.load(f)["fractions"][0]
    assert list(fraction["failed"]) == ["lr1e+12_steps6"] and "non-finite" in fraction["failed"]["lr1e+12_steps6"]
    assert fraction["chosen"]["name"] == "lr0.1_steps6" and summary["mean_auc"] is not None


def test_dinov3_arm_fine_tunes_a_converted_dinov3_vit_with_layer_decay(phantom_cache, tmp_path):
    """configs/dinov2_finetune.py arm=dinov3 on a tiny transformers DINOv3ViTModel converted with
    --format=hf-dinov3 (RoPE, 4 registers, SwiGLU): the whole protocol runs, the encoder starts from the
    converted weights and layer-wise decay applies to its blocks."""
    pytest.importorskip("torch")
    from test_convert import _hf_dinov3_model

    from medssl_jax import config_lib, convert as convert_cli

    _hf_dinov3_model(tmp_path, gated=True, registers=4)
    assert convert_cli.main(["--format=hf-dinov3", f"--input={tmp_path / 'hf3'}", f"--output={tmp_path / 'v3'}"]) == 0
    config = config_lib.load_config("dinov2_finetune", f"runlocal,arm=dinov3,init={tmp_path / 'v3'}")
    assert config.method == "dinov3" and config.init == str(tmp_path / "v3")
    config.data.update(cache_dir=phantom_cache, phantom_patients=64, phantom_size=32)
    config.update(image_size=32, batch_size=16, budget_grid=(4,), eval_every=2, log_every=2, checkpoint_every=4,
                  lr_grid=(1e-4,), layer_decays=(0.75,), seeds=1, selection_evals=2)
    summary = main.run(config, str(tmp_path / "e"))
    assert summary["method"] == "dinov3" and summary["mean_auc"] is not None
    with open(tmp_path / "e" / "finetune.json") as f:
        chosen = json.load(f)["fractions"][0]["chosen"]
    assert chosen["layer_decay"] == 0.75
    exported, config_out = checkpoint.load_export(str(tmp_path / "e" / "export"))
    converted, _ = checkpoint.load_export(str(tmp_path / "v3"))
    assert config_out["model"]["position"] == "rope"
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported["params"]),
                                                       jax.tree.leaves(converted["params"]))]
    assert any(moved)  # it trained from the converted weights (same tree, new values)
