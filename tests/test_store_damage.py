"""A damaged store (truncated or bit-flipped shard, truncated index) is one line naming the store, the
shard and the record, in pretraining and in evaluation; `ingest --verify` lists every damaged record."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import tiny_pretrain_config
from medssl_jax import main
from medssl_jax.data.store import Store, StoreError, StoreWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    """A labelled 2-shard store of 48 noise images (records_per_shard 24), train/val/test splits."""
    path = tmp_path_factory.mktemp("stores") / "clean"
    rng = np.random.default_rng(0)
    with StoreWriter(path, name="clean", label_names=("a", "b"), records_per_shard=24) as writer:
        for i in range(48):
            writer.add(image=rng.integers(0, 4096, (32, 32), dtype=np.uint16), patient=f"p{i // 2}",
                       labels=[i % 2, (i // 2) % 2], bits_stored=12,
                       split=("train", "val", "test")[(i // 2) % 3])
    return path


def damaged_copy(clean_store, tmp_path, how):
    path = tmp_path / "store"
    shutil.copytree(clean_store, path)
    shard = sorted(p for p in os.listdir(path) if p.endswith(".array_record"))[1]
    target = path / shard
    size = os.path.getsize(target)
    if how == "flip":
        with open(target, "r+b") as f:
            f.seek(size // 3)
            chunk = f.read(64)
            f.seek(size // 3)
            f.write(bytes(b ^ 0xFF for b in chunk))
    elif how == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
    elif how == "index":
        with open(path / "index.npz", "r+b") as f:
            f.truncate(os.path.getsize(path / "index.npz") // 2)
    return path, shard


def read_all(path):
    store = Store(path)
    for i in range(len(store)):
        store[i]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_shard_names_store_shard_and_record(clean_store, tmp_path, how):
    path, shard = damaged_copy(clean_store, tmp_path, how)
    with pytest.raises(StoreError) as error:
        read_all(path)
    message = str(error.value)
    assert str(path) in message and shard in message and "\n" not in message
    if how == "flip":
        assert "record" in message and "--verify" in message


def test_truncated_index_is_one_line(clean_store, tmp_path):
    path, _ = damaged_copy(clean_store, tmp_path, "index")
    with pytest.raises(StoreError, match="index.npz is damaged"):
        Store(path)


def test_pretraining_and_probe_on_a_damaged_store_fail_in_one_line(clean_store, tmp_path):
    path, shard = damaged_copy(clean_store, tmp_path, "flip")
    config = tiny_pretrain_config(str(tmp_path), **{"data.store": str(path), "total_steps": 40,
                                                     "batch_size": 8, "data.sampler": "pairs"})
    with pytest.raises(StoreError) as error:
        main.run(config, str(tmp_path / "w"))
    assert shard in str(error.value)


def test_verify_lists_the_damaged_records_and_passes_a_clean_store(clean_store, tmp_path):
    run = lambda store: subprocess.run([sys.executable, "-m", "medssl_jax.ingest", f"--verify={store}", "--quiet"],  # noqa: E731
                                       cwd=REPO, capture_output=True, text=True, timeout=120)
    ok = run(clean_store)
    assert ok.returncode == 0 and "48 records in 2 shards, 0 damaged" in ok.stdout
    path, shard = damaged_copy(clean_store, tmp_path, "flip")
    bad = run(path)
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.startswith("verify:")]
    assert lines and all(shard in line for line in lines)
    assert f"{len(lines)} damaged" in bad.stdout
