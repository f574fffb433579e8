"""Store: write/read round trip, the patient index, and every way the reader refuses a store."""

import json
import math
import os

import numpy as np
import pytest

from medssl_jax.data.store import (INDEX_FILE, STORE_JSON, Store, StoreError, StoreWriter,
                                   decode_record)

LABELS = ["nodule", "effusion"]


def _images(rng):
    return [
        rng.integers(0, 4096, (12, 10), dtype=np.uint16),
        rng.integers(0, 256, (9, 11), dtype=np.uint8),
        rng.integers(-1024, 3000, (8, 8), dtype=np.int16),
        rng.integers(0, 256, (7, 6, 3), dtype=np.uint8),
        rng.integers(0, 65536, (5, 13, 3), dtype=np.uint16),
    ]


def _write_small_store(path, *, records_per_shard=2, **kwargs):
    rng = np.random.default_rng(0)
    images = _images(rng)
    patients = ["p1", "p2", "p1", "p3", "p1"]
    splits = ["train", "test", "train", "train", "train"]
    with StoreWriter(path, name="tiny", label_names=LABELS, records_per_shard=records_per_shard,
                     **kwargs) as w:
        for i, image in enumerate(images):
            labels = [1.0, math.nan] if i % 2 else [0.0, 1.0]
            bits = 12 if image.dtype == np.uint16 and i == 0 else None
            rid = w.add(image=image, patient=patients[i], study=f"s{i // 2}", view="PA",
                        labels=labels, modality="CR", bits_stored=bits, split=splits[i],
                        source_id=100 + i, window_center=40.0)
            assert rid == i
    return images, patients, splits


def test_round_trip_dtypes_shapes_and_metadata(tmp_path):
    images, patients, splits = _write_small_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    assert len(store) == 5 and store.label_names == LABELS and store.name == "tiny"
    # 5 records at 2 per shard -> 3 shards, named with the final count, in record-id order.
    assert [os.path.basename(p) for p in store.shard_paths] == [
        f"tiny-{i:05d}-of-00003.array_record" for i in range(3)]
    assert not [f for f in os.listdir(tmp_path / "s") if f.endswith(".partial")]
    for i, image in enumerate(images):
        record = store[i]
        assert record["image"].dtype == image.dtype
        np.testing.assert_array_equal(record["image"], image)
        assert record["patient"] == patients[i] and record["split"] == splits[i]
        assert record["study"] == f"s{i // 2}" and record["view"] == "PA" and record["modality"] == "CR"
        assert record["source_id"] == 100 + i and record["frame"] == -1
        assert record["window_center"] == 40.0 and math.isnan(record["window_width"])
        assert record["intensity_offset"] == 0.0
    assert store[0]["bits_stored"] == 12
    assert store[1]["bits_stored"] == 8 and store[2]["bits_stored"] == 16
    # Missing labels survive as NaN, both in the record and in the index.
    assert np.isnan(store[1]["labels"][1]) and store[1]["labels"][0] == 1.0
    np.testing.assert_array_equal(store.labels[:, 0], [0, 1, 0, 1, 0])
    assert np.isnan(store.labels[[1, 3], 1]).all()
    np.testing.assert_array_equal(store.patients, patients)
    np.testing.assert_array_equal(store.splits, splits)


def test_data_source_yields_records_in_id_order(tmp_path):
    images, _, _ = _write_small_store(tmp_path / "s")
    source = Store(tmp_path / "s").data_source()
    assert len(source) == 5
    for i in (4, 0, 3):
        np.testing.assert_array_equal(decode_record(source[i])["image"], images[i])


def test_groups_and_split_ids(tmp_path):
    _write_small_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    groups = store.groups()
    assert set(groups) == {"p1", "p2", "p3"}
    np.testing.assert_array_equal(groups["p1"], [0, 2, 4])
    assert set(store.groups("train")) == {"p1", "p3"}
    np.testing.assert_array_equal(store.groups("test")["p2"], [1])
    np.testing.assert_array_equal(store.ids("train"), [0, 2, 3, 4])
    np.testing.assert_array_equal(store.ids(None), np.arange(5))
    with pytest.raises(StoreError, match="unknown split"):
        store.ids("trian")


def test_shards_split_by_bytes(tmp_path):
    with StoreWriter(tmp_path / "s", name="b", label_names=[], shard_bytes=1500) as w:
        for i in range(6):
            w.add(image=np.full((30, 30), i, np.uint8), patient=f"p{i}")  # ~900 B each
    store = Store(tmp_path / "s")
    assert store.meta["shard_num_records"] == [2, 2, 2]
    assert [int(store[i]["image"][0, 0]) for i in range(6)] == list(range(6))


def test_writer_rejects_bad_input(tmp_path):
    with StoreWriter(tmp_path / "s", name="x", label_names=LABELS) as w:
        with pytest.raises(StoreError, match="dtype float32 not supported"):
            w.add(image=np.zeros((4, 4), np.float32), patient="p")
        with pytest.raises(StoreError, match="got 1 labels for 2"):
            w.add(image=np.zeros((4, 4), np.uint8), patient="p", labels=[1.0])
        with pytest.raises(StoreError, match="bits_stored=12 out of range"):
            w.add(image=np.zeros((4, 4), np.uint8), patient="p", bits_stored=12)
        with pytest.raises(StoreError, match="patient key"):
            w.add(image=np.zeros((4, 4), np.uint8), patient="")
        w.add(image=np.zeros((4, 4), np.uint8), patient="p")
    # A second writer into a finished store must be asked to overwrite.
    with pytest.raises(StoreError, match="overwrite=True"):
        StoreWriter(tmp_path / "s", name="x", label_names=LABELS)


def test_overwrite_replaces_the_old_store(tmp_path):
    _write_small_store(tmp_path / "s")
    with StoreWriter(tmp_path / "s", name="new", label_names=["a"], overwrite=True) as w:
        w.add(image=np.ones((3, 3), np.uint8), patient="q")
    store = Store(tmp_path / "s")
    assert store.name == "new" and len(store) == 1
    assert sorted(os.listdir(tmp_path / "s")) == sorted(
        [STORE_JSON, INDEX_FILE, "new-00000-of-00001.array_record"])


def test_reader_error_missing_dir(tmp_path):
    with pytest.raises(StoreError, match="directory does not exist"):
        Store(tmp_path / "nope")


def test_reader_error_not_a_store(tmp_path):
    with pytest.raises(StoreError, match=r"no store.json \(not a store\)"):
        Store(tmp_path)


def test_interrupted_write_is_never_accepted(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s", name="x", label_names=[]) as w:
            w.add(image=np.zeros((4, 4), np.uint8), patient="p")
            raise RuntimeError("killed")
    with pytest.raises(StoreError, match="no store.json"):
        Store(tmp_path / "s")
    # A writer that was never closed (process killed) leaves partial shards and no store.json.
    w = StoreWriter(tmp_path / "k", name="x", label_names=[])
    w.add(image=np.zeros((4, 4), np.uint8), patient="p")
    with pytest.raises(StoreError, match="interrupted or unfinished write"):
        Store(tmp_path / "k")
    w.abort()


def _edit_meta(path, **changes):
    meta = json.loads((path / STORE_JSON).read_text())
    meta.update(changes)
    (path / STORE_JSON).write_text(json.dumps(meta))


def test_reader_error_foreign_format(tmp_path):
    _write_small_store(tmp_path / "s")
    _edit_meta(tmp_path / "s", format="tfds")
    with pytest.raises(StoreError, match="format 'tfds' is not 'medssl_jax.store'"):
        Store(tmp_path / "s")


def test_reader_error_wrong_version(tmp_path):
    _write_small_store(tmp_path / "s")
    _edit_meta(tmp_path / "s", version=99)
    with pytest.raises(StoreError, match="version 99 is not supported"):
        Store(tmp_path / "s")


def test_reader_error_zero_records(tmp_path):
    _write_small_store(tmp_path / "s")
    _edit_meta(tmp_path / "s", num_records=0)
    with pytest.raises(StoreError, match="zero records"):
        Store(tmp_path / "s")
    with pytest.raises(StoreError, match="no records were added"):
        with StoreWriter(tmp_path / "e", name="x", label_names=[]):
            pass


def test_reader_error_missing_shard(tmp_path):
    _write_small_store(tmp_path / "s")
    os.remove(tmp_path / "s" / "tiny-00001-of-00003.array_record")
    with pytest.raises(StoreError, match="1 of 3 shard files missing"):
        Store(tmp_path / "s")


def test_error_messages_are_one_line(tmp_path):
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(StoreError) as info:
            Store(bad)
        assert "\n" not in str(info.value)
