"""Grain pipelines: MICLe/pairs sampling, crop specs, determinism, resume, eval coverage, host sharding."""

import numpy as np
import pytest

from medssl_jax.data import pipeline
from medssl_jax.data.store import Store, StoreWriter

# Patients 0-6 train, 7-9 test; 1-4 images each.
IMAGES_PER_PATIENT = [1, 2, 3, 4, 1, 2, 3, 4, 2, 3]
BITS = 12
SCALE = 65535 / (2**BITS - 1)
GLOBAL = {"name": "global", "num": 2, "size": 16, "scale": (0.3, 1.0)}


def _value_of(record_id):
    # Each record is a constant image whose value names it, so any crop of it still says where it came from.
    return (record_id + 1) * 100


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    with StoreWriter(path, name="toy", label_names=["a", "b"]) as writer:
        for patient, count in enumerate(IMAGES_PER_PATIENT):
            for _ in range(count):
                rid = writer.num_records
                writer.add(image=np.full((24, 20), _value_of(rid), np.uint16), patient=f"p{patient}",
                           labels=[patient % 2, np.nan if rid % 3 == 0 else 1.0], bits_stored=BITS,
                           split="train" if patient < 7 else "test")
    return Store(path)


def _record_of(view):
    values = np.unique(view)
    assert len(values) == 1, "a crop of a constant image must stay constant"
    return int(round(values[0] / SCALE / 100)) - 1


def _iterator(store, *, sampler="micle", crops=(GLOBAL,), batch=4, seed=0, **kwargs):
    return pipeline.make_pretrain_iterator(
        store, spec={"sampler": sampler, "crops": list(crops)}, batch_size_per_host=batch, seed=seed,
        process_index=0, process_count=1, with_record_ids=True, **kwargs)


def _same(a, b):
    """Batches are equal key by key (NaN labels compare equal)."""
    if a.keys() != b.keys():
        return False
    try:
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    except AssertionError:
        return False
    return True


def test_micle_pairs_come_from_one_patient_and_are_distinct(store):
    groups = store.groups("train")
    patient_of = {int(r): p for p, ids in groups.items() for r in ids}
    it = _iterator(store)
    seen_patients = []
    for _ in range(7):  # 28 elements = 4 epochs over the 7 train patients
        batch = next(it)
        assert batch["global"].shape == (4, 2, 16, 16, 1) and batch["global"].dtype == np.uint16
        for views, (a, b) in zip(batch["global"], batch["record_ids"]):
            assert (_record_of(views[0]), _record_of(views[1])) == (a, b)
            assert patient_of[a] == patient_of[b]
            assert (a != b) == (len(groups[patient_of[a]]) >= 2)
            seen_patients.append(patient_of[a])
    # Each epoch visits every patient once, whatever its number of images.
    for epoch in range(4):
        assert sorted(seen_patients[7 * epoch:7 * epoch + 7]) == sorted(groups)


def test_pairs_sampler_gives_two_views_of_each_image_once_per_epoch(store):
    train_ids = store.ids("train")
    assert len(train_ids) == 16
    it = _iterator(store, sampler="pairs")
    ids = np.concatenate([next(it)["record_ids"] for _ in range(4)])
    assert (ids[:, 0] == ids[:, 1]).all()
    assert sorted(ids[:, 0]) == list(train_ids)


def test_multi_crop_keys_and_shapes(store):
    local = {"name": "local", "num": 3, "size": 8, "scale": (0.05, 0.3)}
    batch = next(_iterator(store, crops=(GLOBAL, local), batch=2))
    assert batch["global"].shape == (2, 2, 16, 16, 1) and batch["local"].shape == (2, 3, 8, 8, 1)
    assert batch["local"].dtype == np.uint16
    # Local crop k comes from the element's image k % 2, like the global ones.
    for g, l, (a, b) in zip(batch["global"], batch["local"], batch["record_ids"]):
        assert [_record_of(v) for v in l] == [a, b, a]


def test_same_seed_same_batches_other_seed_differs(store):
    first = next(_iterator(store, seed=5))
    again = next(_iterator(store, seed=5))
    other = next(_iterator(store, seed=6))
    assert _same(first, again)
    assert not _same(first, other)


def test_resume_from_state_reproduces_next_batches(store):
    it = _iterator(store, sampler="pairs")
    for _ in range(5):  # past the first epoch boundary (4 batches)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = _iterator(store, sampler="pairs")
    resumed.set_state(state)
    assert all(_same(e, next(resumed)) for e in expected)


def test_worker_processes_give_the_same_stream(store):
    local = _iterator(store, batch=2)
    workers = _iterator(store, batch=2, num_workers=2)
    for _ in range(3):
        assert _same(next(local), next(workers))
    state = workers.get_state()
    expected = next(workers)
    # The state of a multi-worker iterator restores into one with the same number of workers.
    fresh = _iterator(store, batch=2, num_workers=2)
    fresh.set_state(state)
    assert _same(expected, next(fresh))


def test_eval_covers_every_record_once_with_padding(store):
    batches = list(pipeline.make_eval_iterator(store, split="test", image_size=10, batch_size_per_host=4,
                                               process_index=0, process_count=1))
    assert len(batches) == 3  # 9 test records -> 4 + 4 + 1 real, 3 padded
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 9 and not mask[-3:].any() and (index[~mask] == -1).all()
    np.testing.assert_array_equal(index[mask], store.ids("test"))
    labels = np.concatenate([b["labels"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, store.labels[index[mask]])  # NaN == NaN here
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (12, 10, 10, 1) and images.dtype == np.uint16
    assert [_record_of(im) for im in images[mask]] == list(index[mask])


def test_eval_is_deterministic(store):
    def run():
        return list(pipeline.make_eval_iterator(store, split=None, image_size=8, batch_size_per_host=8,
                                                process_index=0, process_count=1))
    assert all(_same(a, b) for a, b in zip(run(), run()))


def test_hosts_get_disjoint_slices_that_together_are_the_single_process_global_batch(store):
    spec = {"sampler": "pairs", "crops": [GLOBAL]}
    per_host, hosts = [], []
    for host in range(2):
        ds = pipeline.make_pretrain_dataset(store, spec=spec, batch_size_per_host=2, seed=0,
                                            process_index=host, process_count=2, with_record_ids=True)
        hosts.append(ds)
        per_host.append({int(r) for i in range(4) for r in ds[i]["record_ids"][:, 0]})  # 2 x 8 of 16: one epoch
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == set(store.ids("train").tolist())
    # Host 0's batch t, then host 1's, is the global batch t of one process (same records, crops, order).
    single = pipeline.make_pretrain_dataset(store, spec=spec, batch_size_per_host=4, seed=0, process_index=0,
                                            process_count=1, with_record_ids=True)
    for t in range(3):
        dealt = {k: np.concatenate([hosts[0][t][k], hosts[1][t][k]]) for k in single[t]}
        assert _same(dealt, single[t])

    eval_batches = [list(pipeline.make_eval_iterator(store, split=None, image_size=8, batch_size_per_host=4,
                                                     process_index=h, process_count=3)) for h in range(3)]
    assert len({len(b) for b in eval_batches}) == 1  # same batch count on every host
    indices = [np.concatenate([b["index"][b["mask"]] for b in host]) for host in eval_batches]
    everything = np.concatenate(indices)
    assert len(everything) == len(set(everything.tolist())) == len(store)


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = pipeline.random_resized_crop_box(60, 80, scale=(0.2, 0.5), ratio=(0.75, 4 / 3),
                                                           rng=rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.17 <= h * w / (60 * 80) <= 0.53  # rounding of h and w
        assert 0.7 <= w / h <= 1.4


def test_crop_resize_flip_and_intensity_rescale():
    gradient = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))  # increases left to right
    gradient[:, -1] = 255
    box = pipeline.center_square_box(32, 32)
    plain = pipeline.crop_resize_uint16(gradient, box, 16, value_scale=65535 / 255)
    flipped = pipeline.crop_resize_uint16(gradient, box, 16, value_scale=65535 / 255, flip=True)
    assert plain.shape == (16, 16, 1)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert (np.diff(plain[0, :, 0].astype(int)) > 0).all()
    full = pipeline.crop_resize_uint16(np.full((5, 5), 4095, np.uint16), (0, 0, 5, 5), 3,
                                       value_scale=pipeline.full_range_scale({"bits_stored": 12}))
    assert (full == 65535).all()
    rgb = pipeline.crop_resize_uint16(np.zeros((9, 7, 3), np.uint8), pipeline.center_square_box(9, 7), 4,
                                      value_scale=1.0)
    assert rgb.shape == (4, 4, 3)


def test_bad_specs_fail_clearly(store):
    with pytest.raises(ValueError, match="sampler 'simclr' unknown"):
        _iterator(store, sampler="simclr")
    with pytest.raises(ValueError, match="fewer than batch_size_per_host=8"):
        _iterator(store, batch=8)  # 7 train patients
    with pytest.raises(ValueError, match=r"lacks \['scale'\]"):
        _iterator(store, crops=({"name": "global", "num": 2, "size": 8},))
    with pytest.raises(ValueError, match="scale"):
        _iterator(store, crops=({**GLOBAL, "scale": (0.5, 1.5)},))
