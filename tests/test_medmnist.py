"""MedMNIST v2 .npz -> store: official splits kept, one-vs-rest label columns, malformed files refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medssl_jax import main
from medssl_jax.data import medmnist
from medssl_jax.data.store import Store
from medssl_jax.evaluate import linear_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 40, "val": 12, "test": 20}


def make_npz(path, *, channels=None, classes=2, multi_label=0, size=28, seed=0, **replace):
    """A file with MedMNIST's layout: {split}_images uint8 [N, H, W(, C)], {split}_labels int [N, 1 or K]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, size, size) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = rng.integers(0, 2, (n, multi_label)) if multi_label else rng.integers(0, classes, (n, 1))
        if not multi_label:
            labels[:classes, 0] = np.arange(classes)  # every class present in every split
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


def ingest(*args):
    return subprocess.run([sys.executable, "-m", "medssl_jax.ingest", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_binary_file_keeps_the_official_splits_and_the_class_one_column(tmp_path):
    npz = make_npz(tmp_path / "pneumoniamnist.npz")
    out = ingest(f"--medmnist={npz}", f"--output={tmp_path / 'store'}")
    assert out.returncode == 0, out.stderr
    store = Store(tmp_path / "store")
    assert store.label_names == ["pneumonia"]
    data = np.load(npz)
    for split, n in SIZES.items():
        ids = store.ids(split)
        assert len(ids) == n
        np.testing.assert_array_equal(store.labels[ids, 0], data[f"{split}_labels"][:, 0] == 1)
        np.testing.assert_array_equal(store[int(ids[3])]["image"], data[f"{split}_images"][3])
    assert len(np.unique(store.patients)) == sum(SIZES.values())  # one image per "patient"
    with open(tmp_path / "store" / "ingest_report.json") as f:
        assert json.load(f)["task"] == "binary"


def test_multiclass_rgb_becomes_one_vs_rest_columns_and_chestmnist_keeps_its_14_labels(tmp_path):
    path_npz = make_npz(tmp_path / "pathmnist_64.npz", channels=3, classes=9, size=64)
    data = medmnist.read_medmnist(path_npz)
    assert data["task"] == "multi-class" and len(data["label_names"]) == 9 and data["label_names"][0] == "adipose"
    images, columns = data["splits"]["test"]
    raw = np.load(path_npz)["test_labels"][:, 0]
    np.testing.assert_array_equal(columns.argmax(axis=1), raw)
    assert (columns.sum(axis=1) == 1).all() and images.shape[1:] == (64, 64, 3)
    chest = medmnist.read_medmnist(make_npz(tmp_path / "chestmnist.npz", multi_label=14))
    assert chest["task"] == "multi-label" and chest["label_names"][:2] == ["atelectasis", "cardiomegaly"]
    np.testing.assert_array_equal(chest["splits"]["val"][1], np.load(tmp_path / "chestmnist.npz")["val_labels"])
    unknown = medmnist.read_medmnist(make_npz(tmp_path / "mydata.npz", classes=3), label_names=("a", "b", "c"))
    assert unknown["task"] == "multi-class" and unknown["label_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("replace, key", [
    ({"val_labels": None}, "'val_labels' is missing"),
    ({"test_labels": np.zeros((3, 1), np.uint8)}, "'test_labels' has shape (3, 1) for 20 images"),
    ({"train_images": np.zeros((40, 28, 28), np.float32)}, "'train_images' has dtype float32"),
    ({"val_labels": np.zeros((12, 1), np.float32)}, "'val_labels' has dtype float32"),
])
def test_malformed_file_is_one_line_naming_the_key(tmp_path, replace, key):
    npz = make_npz(tmp_path / "pneumoniamnist.npz", **replace)
    out = ingest(f"--medmnist={npz}", f"--output={tmp_path / 'store'}")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and key in out.stderr, out.stderr
    assert not (tmp_path / "store").exists()
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    assert "not a readable .npz" in ingest(f"--medmnist={tmp_path / 'junk.npz'}",
                                           f"--output={tmp_path / 'store'}").stderr


def test_linear_probe_on_a_medmnist_store_validates_on_its_val_split(tmp_path):
    npz = make_npz(tmp_path / "breastmnist.npz", size=28)
    medmnist.write_store(npz, tmp_path / "store")
    config = linear_probe.reference_config()
    config.init = "random"
    config.model = {"name": "resnet", "depth": 18, "width": 1, "base_width": 4, "zero_init_last_bn": False}
    config.data.store = str(tmp_path / "store")
    config.image_size, config.batch_size, config.c_grid = 28, 8, (1.0,)
    summary = main.run(config, str(tmp_path / "probe"))
    with open(tmp_path / "probe" / "splits.json") as f:
        splits = json.load(f)
    assert splits["params"]["val"] == "val" and len(splits["val"]) == SIZES["val"]
    assert summary["label_names"] == ["normal, benign"] and summary["num_examples"] == SIZES["test"]
