"""The online monitor (medssl_jax/monitor.py): its metrics against NumPy / scikit-learn references, the
subsets it scores (validation, never test), a pretraining run that logs, plots and exports its best step,
and a deliberately collapsed run that is flagged and, with the option, stopped with a checkpoint.
(Multi-process and FSDP equality: test_multiprocess.py and test_fsdp.py; learning: test_learning.py.)"""

import json
import math
import os

import numpy as np
import pytest
import scipy.spatial.distance
from sklearn.neighbors import KNeighborsClassifier

from helpers import tiny_pretrain_config
from medssl_jax import checkpoint, train
from medssl_jax import monitor as monitor_lib
from medssl_jax.data import phantoms
from medssl_jax.data.store import Store, StoreWriter


def test_rankme_std_alignment_uniformity_match_numpy_references():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    sigma = np.linalg.svd(x, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    # Garrido et al.: p_k = sigma_k / ||sigma||_1 + eps (not renormalised), RankMe = exp(-sum p_k log p_k).
    assert monitor_lib.rankme(embeddings=x) == pytest.approx(math.exp(-sum(v * math.log(v) for v in p)), rel=1e-9)
    assert monitor_lib.rankme(embeddings=np.tile(rng.normal(size=(1, 12)), (64, 1))) == pytest.approx(1.0, abs=1e-4)
    assert monitor_lib.rankme(embeddings=np.eye(12)) == pytest.approx(12.0, rel=1e-5)

    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert monitor_lib.embedding_std(embeddings=x) == pytest.approx(np.mean(np.std(unit, axis=0, ddof=1)))
    assert monitor_lib.embedding_std(embeddings=np.ones((8, 4))) == pytest.approx(0.0, abs=1e-12)

    y = x + rng.normal(scale=0.5, size=x.shape)
    unit_y = y / np.linalg.norm(y, axis=1, keepdims=True)
    align = np.mean([np.sum((a - b) ** 2) for a, b in zip(unit, unit_y)])  # Wang & Isola, alpha = 2
    assert monitor_lib.alignment(z1=x, z2=y) == pytest.approx(align, rel=1e-9)
    pdist = scipy.spatial.distance.pdist(unit, "sqeuclidean")  # every distinct pair once
    assert monitor_lib.uniformity(z=x) == pytest.approx(np.log(np.mean(np.exp(-2 * pdist))), rel=1e-7)


def test_knn_scores_match_scikit_learn_weighted_neighbours():
    rng = np.random.default_rng(1)
    memory, queries = rng.normal(size=(80, 6)), rng.normal(size=(30, 6))
    labels = (memory[:, :3] + rng.normal(scale=0.7, size=(80, 3)) > 0).astype(np.float64)
    labels[rng.random((80, 3)) < 0.15] = np.nan  # missing labels are left out per label
    k, temperature = 7, 0.07
    ours = monitor_lib.knn_scores(memory=memory, memory_labels=labels, queries=queries, k=k, temperature=temperature)
    for j in range(3):
        known = ~np.isnan(labels[:, j])
        # Cosine distance d = 1 - similarity: DINO's weight exp(similarity / T).
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                         weights=lambda d: np.exp((1 - d) / temperature))
        reference.fit(memory[known], labels[known, j])
        np.testing.assert_allclose(ours[:, j], reference.predict_proba(queries)[:, 1], rtol=1e-9, atol=1e-12)


def test_ridge_probe_scores_rank_like_scikit_learn_per_label():
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(2)
    x, q = rng.normal(size=(100, 5)), rng.normal(size=(20, 5))
    y = (x[:, :2] > 0).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    expected = [RidgeCV(alphas=monitor_lib.RIDGE_ALPHAS).fit((x - mean) / std, y[:, j]).predict((q - mean) / std)
                for j in range(2)]
    np.testing.assert_allclose(monitor_lib.ridge_scores(train=x, train_labels=y, queries=q),
                               np.stack(expected, 1), rtol=1e-5, atol=1e-6)
    y[3, 1] = np.nan  # the per-label path gives the same labels' scores
    with_nan = monitor_lib.ridge_scores(train=x, train_labels=y, queries=q)
    np.testing.assert_allclose(with_nan[:, 0], expected[0], rtol=1e-5, atol=1e-6)


def _store(path, splits):
    with StoreWriter(path, name="s", label_names=("a",)) as writer:
        for i, split in enumerate(splits):
            writer.add(image=np.full((8, 8), i, np.uint16), patient=f"p{i // 2}", labels=[i % 2], split=split)
    return Store(path)


def test_the_monitor_scores_validation_images_never_test(tmp_path):
    config = tiny_pretrain_config("")
    config.monitor.update(num_train=5, num_val=3)
    store = _store(tmp_path / "a", ["train"] * 12 + ["val"] * 6 + ["test"] * 6)
    memory, val, source = monitor_lib.subsets(store, config)
    assert set(store.splits[memory]) == {"train"} and set(store.splits[val]) == {"val"}
    assert (len(memory), len(val)) == (5, 3) and "'val' split" in source
    again = monitor_lib.subsets(store, config)
    np.testing.assert_array_equal(again[0], memory)  # fixed and seeded
    # No 'val' split: held-out train patients, disjoint from the memory bank's patients.
    config.data.split = "train"
    config.monitor.update(num_train=100, num_val=100)
    store = _store(tmp_path / "b", ["train"] * 40 + ["test"] * 6)
    memory, val, source = monitor_lib.subsets(store, config)
    assert "held out" in source and set(store.splits[val]) == {"train"}
    assert not set(store.patients[memory]) & set(store.patients[val])
    assert len(memory) + len(val) == 40


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def _monitored(cache, **monitor):
    config = tiny_pretrain_config(cache, total_steps=6, checkpoint_every=3, log_every=3)
    config.probe.enabled = False
    config.monitor.update(every=3, **monitor)
    return config


def test_a_run_logs_plots_and_exports_its_best_monitor_step(phantom_cache, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train.pretrain(_monitored(phantom_cache, export_best=True), workdir)
    out = capsys.readouterr().out
    curves = monitor_lib.read_curves(workdir)
    for name in ("knn_auc", "probe_auc", "rankme", "embedding_std", "alignment", "uniformity"):
        assert [s for s, _ in curves["monitor/" + name]] == [0, 3, 6], name
        assert all(math.isfinite(v) for _, v in curves["monitor/" + name]), name
    assert [s for s, _ in curves["monitor/random_init_knn_auc"]] == [0]  # the reference line, once
    assert os.path.isfile(os.path.join(workdir, "monitor.png"))
    metric, step, value = monitor_lib.best(curves)
    assert metric == "monitor/knn_auc" and f"monitor: best monitor/knn_auc {value:.4f} at step {step}" in out
    _, record = checkpoint.load_export(os.path.join(workdir, "export_best"))
    assert record["source"]["best"] == {"metric": "monitor/knn_auc", "step": step}
    assert "evaluations in this run took" in out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert all(not k.startswith("_") for row in map(json.loads, f) for k in row)


def test_random_init_reference_is_the_better_of_both_residual_inits_per_metric(phantom_cache, tmp_path):
    """The reference line is the stronger of a ResNet's two standard random inits, metric by metric."""
    config = _monitored(phantom_cache)
    run = train.setup(config)
    monitor = monitor_lib.Monitor(config, method=run.method, model=run.model, mesh=run.mesh, store=run.store)
    reference = monitor.score_random_init(str(tmp_path))
    each = [monitor._score_random_encoder({**config.model.to_dict(), "dtype": "float32", "zero_init_last_bn": z})
            for z in (False, True)]
    for key in ("knn_auc", "probe_auc"):
        assert reference["monitor/random_init_" + key] == max(v["monitor/" + key] for v in each)
    assert each[0]["monitor/knn_auc"] != each[1]["monitor/knn_auc"]  # two different encoders were scored
    assert monitor.score_random_init(str(tmp_path)) == reference  # cached


def _constant_embeddings(monkeypatch):
    """Every image gets the same embedding: a collapsed encoder, as the monitor sees it."""
    real = monitor_lib.embed_fn

    def collapsed(encoder):
        embed = real(encoder)
        return lambda variables, images: embed(variables, images) * 0.0 + 1.0

    monkeypatch.setattr(monitor_lib, "embed_fn", collapsed)


def test_a_collapsed_run_is_flagged_in_one_line_and_can_stop_with_a_checkpoint(phantom_cache, tmp_path, capsys,
                                                                              monkeypatch):
    _constant_embeddings(monkeypatch)
    workdir = str(tmp_path / "warn")
    train.pretrain(_monitored(phantom_cache, random_reference=False), workdir)  # warns, goes on
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: collapse")]
    assert [w.split(":")[1].strip() for w in warnings] == ["collapse at step 3", "collapse at step 6"]
    assert "monitor/rankme=1.000" in warnings[0]

    workdir = str(tmp_path / "stop")
    with pytest.raises(train.TrainingError, match=r"collapse at step 3: monitor/rankme=.*stopped "
                                                  r"\(monitor.stop_on_collapse\) with a checkpoint at step 3"):
        train.pretrain(_monitored(phantom_cache, random_reference=False, stop_on_collapse=True), workdir)
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_intact_step() == 3
    ckpt.close()


def test_bad_monitor_values_are_refused_in_one_line(phantom_cache):
    from medssl_jax import config_lib

    for field, value in (("every", -2), ("num_val", 0), ("knn_k", -1), ("num_train", 0)):
        config = _monitored(phantom_cache)
        config.monitor[field] = value
        with pytest.raises(ValueError, match=rf"config.monitor.{field}="):
            config_lib.validate_pretrain(config)


def test_the_best_step_of_an_unlabelled_run_is_its_highest_rankme():
    # No labels: no kNN / probe AUC; the run-end line and export_best go by RankMe (Garrido et al.'s
    # label-free choice), ties to the earliest step.
    curves = {"monitor/rankme": [(0, 1.9), (10, 14.0), (20, 14.0), (30, 9.0)], "monitor/embedding_std": [(0, 0.1)]}
    assert monitor_lib.best(curves) == ("monitor/rankme", 10, 14.0)
    assert monitor_lib.summary(curves).startswith("monitor: best monitor/rankme 14.0000 at step 10 (start 1.9000")
    assert monitor_lib.collapse_message({"monitor/rankme": 1.2, "monitor/embedding_std": 0.1, "_dim": 64},
                                        step=5).startswith("collapse at step 5: monitor/rankme=1.200 < 1.5")
    assert monitor_lib.collapse_message({"monitor/rankme": 8.0, "monitor/embedding_std": 1e-4, "_dim": 64},
                                        step=5).startswith("collapse at step 5: monitor/embedding_std=")
    assert monitor_lib.collapse_message({"monitor/rankme": 8.0, "monitor/embedding_std": 0.1, "_dim": 64}, step=5) is None
