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
    assert set(small_store.splits) == {"train", "test"}
    assert not np.isnan(small_store.labels).any()


def test_prevalences_and_group_sizes_at_scale():
    cohort = phantoms.sample_cohort(num_patients=400, seed=0)
    assert set(np.unique(cohort["num_images"])) == {1, 2, 3, 4}
    for split in ("train", "test"):
        labels = cohort["labels"][cohort["split"] == split]
        prevalence = labels.mean(axis=0)
        assert ((prevalence >= 0.05) & (prevalence <= 0.40)).all(), (split, prevalence)
    test_fraction = (cohort["split"] == "test").mean()
    assert 0.2 < test_fraction < 0.4


def test_every_label_has_both_classes_in_each_split_even_when_tiny():
    cohort = phantoms.sample_cohort(num_patients=8, seed=1)
    for split in ("train", "test"):
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
    params = dict(num_patients=5, image_size=32, seed=0)
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
