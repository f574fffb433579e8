"""Phantom dataset: deterministic, patient-consistent labels, sane prevalences, patient-wise splits."""

import os

import numpy as np
import pytest

from medssl_jax.data import phantoms
from medssl_jax.data.store import STORE_JSON, Store

SMALL = dict(num_patients=16, image_size=48, seed=3)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return Store(phantoms.ensure_phantom_store(tmp_path_factory.mktemp("cache"), **SMALL))


def test_same_seed_gives_identical_records(small_store, tmp_path):
    again = Store(phantoms.ensure_phantom_store(tmp_path, **SMALL))
    a, b = small_store.data_source(), again.data_source()
    assert len(a) == len(b)
    assert all(a[i] == b[i] for i in range(len(a)))
    other = Store(phantoms.ensure_phantom_store(tmp_path, **{**SMALL, "seed": 4}))
    assert other.path != again.path
    assert other[0]["image"].tobytes() != again[0]["image"].tobytes()


def test_images_are_16_bit_radiographs(small_store):
    for i in range(len(small_store)):
        record = small_store[i]
        image = record["image"]
        assert image.dtype == np.uint16 and image.shape == (48, 48)
        assert record["bits_stored"] in (12, 16)
        assert int(image.max()) <= 2 ** record["bits_stored"] - 1
        # Air outside the body is dark, the mediastinum/spine bright: a real dynamic range.
        assert image.max() - image.min() > 0.4 * (2 ** record["bits_stored"] - 1)
        assert record["view"] in ("PA", "AP") and record["modality"] == "DX"


def test_labels_consistent_within_patient_and_split_patient_wise(small_store):
    groups = small_store.groups()
    assert len(groups) == SMALL["num_patients"]
    for ids in groups.values():
        assert 1 <= len(ids) <= 4
        labels = small_store.labels[ids]
        assert (labels == labels[0]).all()
        assert len(set(small_store.splits[ids])) == 1
    assert set(small_store.splits) == {"train", "val", "test"}
    assert not np.isnan(small_store.labels).any()


def test_prevalences_and_group_sizes_at_scale():
    cohort = phantoms.sample_cohort(num_patients=400, seed=0)
    assert set(np.unique(cohort["num_images"])) == {1, 2, 3, 4}
    for split in ("train", "val", "test"):
        labels = cohort["labels"][cohort["split"] == split]
        prevalence = labels.mean(axis=0)
        assert ((prevalence >= 0.05) & (prevalence <= 0.40)).all(), (split, prevalence)
    for split, fraction in phantoms.SPLIT_FRACTIONS.items():
        assert (cohort["split"] == split).mean() == pytest.approx(fraction, abs=0.01)


def test_every_label_has_both_classes_in_each_split_even_when_tiny():
    cohort = phantoms.sample_cohort(num_patients=8, seed=1)
    for split in ("train", "val", "test"):
        labels = cohort["labels"][cohort["split"] == split]
        assert (labels.max(axis=0) == 1).all() and (labels.min(axis=0) == 0).all()


def test_findings_change_only_positive_patients_images():
    cohort = phantoms.sample_cohort(num_patients=30, seed=2)
    ids = np.arange(len(cohort["image_patient"]))
    with_findings = phantoms.render_images(cohort, ids, image_size=32).astype(np.int64)
    healthy = {**cohort, "labels": np.zeros_like(cohort["labels"])}
    healthy["heart_scale"] = np.where(cohort["labels"][:, 2] == 1, 1.0, cohort["heart_scale"])
    without = phantoms.render_images(healthy, ids, image_size=32).astype(np.int64)
    changed = np.abs(with_findings - without).reshape(len(ids), -1).max(axis=1) > 0
    positive = cohort["labels"][cohort["image_patient"]].any(axis=1)
    np.testing.assert_array_equal(changed, positive)


def test_ensure_is_idempotent_and_repairs_incomplete_store(tmp_path):
    params = dict(num_patients=6, image_size=32, seed=0)
    path = phantoms.ensure_phantom_store(tmp_path, **params)
    stamp = os.stat(path / STORE_JSON).st_mtime_ns
    assert phantoms.ensure_phantom_store(tmp_path, **params) == path
    assert os.stat(path / STORE_JSON).st_mtime_ns == stamp
    os.remove(path / STORE_JSON)  # as if the first run had been killed before finishing
    assert phantoms.ensure_phantom_store(tmp_path, **params) == path
    assert len(Store(path)) > 0
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary directories left behind


def test_rejects_too_few_patients(tmp_path):
    with pytest.raises(ValueError, match="num_patients=2"):
        phantoms.ensure_phantom_store(tmp_path, num_patients=2, image_size=32, seed=0)


def _probe_auc(features: np.ndarray, labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Test AUC per label of a logistic regression on standardised features fit on the train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train, test = split == "train", split == "test"
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-9)
    return np.array([roc_auc_score(labels[test, j], LogisticRegression(max_iter=2000).fit(
        x[train], labels[train, j]).decision_function(x[test])) for j in range(labels.shape[1])])


def test_nuisance_is_independent_of_the_findings_and_the_findings_are_solvable():
    # The store of the :runlocal configs. Every acquisition draw (exposure, gamma, noise, framing,
    # collimation, markers, inspiration, view) and every anatomy draw alone predicts no label; the true
    # finding parameters predict them all (the task is solvable).
    cohort = phantoms.sample_cohort(num_patients=2000, seed=0)
    patient = cohort["image_patient"]
    labels = cohort["labels"][patient]
    split = cohort["split"][patient]
    skip = {"image_patient", "image_study", "image_noise_seed", "image_view"}
    nuisance = [cohort[k].reshape(len(patient), -1) for k in cohort if k.startswith("image_") and k not in skip]
    nuisance.append((cohort["image_view"] == "AP")[:, None])
    nuisance += [cohort[k][patient][:, None] for k in phantoms.ANATOMY] + [cohort["bits_stored"][patient][:, None]]
    auc = _probe_auc(np.concatenate(nuisance, axis=1).astype(np.float64), labels, split)
    # ~1750 test images: chance AUCs scatter by about +-0.02 (2 standard errors ~0.04 at 10 % prevalence).
    assert np.all(np.abs(auc - 0.5) < 0.05), auc
    truth = np.column_stack([labels[:, 0] * cohort["nodule_amp"][patient],
                             labels[:, 1] * cohort["effusion_height"][patient],
                             cohort["heart_scale"][patient], labels[:, 3] * cohort["ptx_gap"][patient]])
    assert np.all(_probe_auc(truth, labels, split) > 0.99)


def test_runlocal_test_split_is_large_enough_for_a_tight_mean_auc_ci():
    # The :runlocal phantoms' test split: a bootstrap CI of the mean AUC of a moderately good scorer
    # (AUC ~0.7 per label) is about +-0.02 wide, well inside the +-0.03 the evidence needs.
    from medssl_jax import config_lib
    from medssl_jax.evaluate import bootstrap

    cohort = phantoms.sample_cohort(num_patients=config_lib.RUNLOCAL_PHANTOMS["phantom_patients"], seed=0)
    test = cohort["split"][cohort["image_patient"]] == "test"
    labels = cohort["labels"][cohort["image_patient"]][test]
    assert len(labels) > 1500
    scores = labels * 0.3 + np.random.default_rng(0).random(labels.shape)
    result = bootstrap.paired_bootstrap(probs={"m": scores}, labels=labels, label_names=list(phantoms.LABEL_NAMES),
                                        num_resamples=300, youden=False)
    ci = result["models"]["m"]["mean_auc"]
    assert 0.6 < ci["point"] < 0.8 and ci["ci_high"] - ci["ci_low"] < 0.05
