"""configs/swav.py and configs/hybrid.py, and the hybrid through the real train loop: multi-crop batches
from the pipeline, 8 fake devices, the queue checkpointed and restored with the run."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import final_state, shrink_to_tiny
from medssl_jax import config_lib, intensity, main, train
from medssl_jax.data import phantoms
from medssl_jax.methods import swav



load_config = config_lib.load_config


@pytest.mark.parametrize("name", ["swav", "hybrid"])
def test_config_files(name):
    full = load_config(name)
    config_lib.check_known_keys(full, main.reference_config(full))
    assert full.method == name and full.model.depth == 50 and full.swav.num_prototypes == 3000
    spec = swav.data_spec(full)
    assert [(c["num"], c["size"], c["scale"]) for c in spec["crops"]] == [(2, 224, (0.14, 1.0)),
                                                                         (6, 96, (0.05, 0.14))]
    # SwAV's durations are epochs (prototypes frozen 1 epoch, queue from epoch 15) and its optimiser LARC;
    # on ImageNet's 1,281,167 images at batch 256 the epochs become SwAV's own step counts.
    assert full.optim.name == "larc" and not full.optim.larc_clip
    steps = config_lib.resolve_durations(full, epoch_size=1_281_167, batch_size=256)
    assert steps.swav.freeze_prototypes_steps == 5005 and steps.swav.queue_start_steps == 75_069
    assert full.swav.queue_start_steps == -1  # the recipe itself is left as written
    local = load_config(name, "runlocal")
    config_lib.check_known_keys(local, main.reference_config(local))
    assert local.compute_dtype == "float32" and local.total_steps <= 600  # minutes on 2 CPU cores
    with pytest.raises(ValueError, match="not one of"):
        load_config(name, "runlocal,variant=r50x4")
    if name == "hybrid":
        c = load_config(name, "micle,supervised=0.5,num_labels=5")
        assert c.data.sampler == "micle" and c.hybrid.supervised_weight == 0.5 and c.hybrid.num_labels == 5
        assert swav.data_spec(c)["fields"] == ["labels"]


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def tiny_config(cache_dir, method="hybrid"):
    c = shrink_to_tiny(load_config(method, "runlocal"), cache_dir)
    c.swav.local_image_size = 12
    c.swav.num_local_crops = 2
    c.swav.num_prototypes = 10
    c.swav.freeze_prototypes_steps = 2
    c.swav.queue_length = 32  # two batches: filled at steps 1 and 2, used from step 3
    c.swav.queue_start_steps = 1
    c.log_every = 1
    c.probe.enabled = False
    return c


def test_hybrid_resume_with_queue_equals_uninterrupted(phantom_cache, tmp_path):
    config = tiny_config(phantom_cache)
    straight = str(tmp_path / "straight")
    result = train.pretrain(config, straight)
    assert result.steps_done == 6 and result.export_dir is not None
    interrupted = str(tmp_path / "interrupted")
    assert train.pretrain(config, interrupted, stop_after=3).steps_done == 3
    step, state = final_state(interrupted)
    assert step == 3 and np.any(np.asarray(state["method_state"]["queue"]))  # the queue is in the checkpoint
    train.pretrain(config, interrupted)
    (step_a, a), (step_b, b) = final_state(straight), final_state(interrupted)
    assert step_a == step_b == 6
    assert np.asarray(a["method_state"]["queue"]).shape == (2, 32, 8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    kernel = np.asarray(a["params"]["prototypes"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5)
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        used = [json.loads(line).get("swav/queue_used") for line in f]
    assert used[:3] == [0.0, 0.0, 0.0] and used[3:] == [1.0, 1.0, 1.0]


def _mixed_modality_store(tmp_path):
    """CT, MR, ultrasound and CR: pydicom's and pydicom-data's real files, each copied for 4 patients x 2
    images (new PatientID and UID; the uncompressed ones with shifted pixels), listed in a CSV with a label
    and ingested as a user would (DICOM by content, patients from the CSV)."""
    import csv

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medssl_jax import ingest

    names = {"CT": "CT_small.dcm", "MR": "MR_small.dcm", "US": "US1_J2KR.dcm", "CR": "RG1_UNCR.dcm"}
    paths = {m: get_testdata_file(n, download=False) for m, n in names.items()}
    if None in paths.values():
        pytest.skip("pydicom-data not installed")
    src, rows, rng = tmp_path / "dicom", [], np.random.default_rng(0)
    src.mkdir()
    for modality, template in paths.items():
        for patient in range(4):
            for image in range(2):
                ds = pydicom.dcmread(template)
                ds.PatientID, ds.SOPInstanceUID = f"{modality}{patient}", generate_uid()
                if not ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.PixelData = np.roll(ds.pixel_array, 3 * patient + image, axis=1).tobytes()
                name = f"{modality}_{patient}_{image}.dcm"
                ds.save_as(src / name)
                rows.append([name, f"{modality}{patient}", int(rng.integers(0, 2))])
    with open(src / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "patient", "finding"], *rows])
    store = tmp_path / "mixed"
    assert ingest.main([f"--csv={src / 'cases.csv'}", f"--output={store}", "--size=32", "--workers=1", "--quiet"]) == 0
    return str(store)


def test_hybrid_pretrains_on_a_mixed_ct_mr_us_xray_dicom_store_with_each_modality_windowed_its_own_way(
        phantom_cache, tmp_path):
    """Ghesu's setting end to end: a store of four modalities, the hybrid with MICLe pairs, the supervised
    term and `intensity.modality_aware`: the pipeline delivers each image's modality fields, and each crop
    reaches the encoder through its own mapping (CT: a HU window, MR: percentiles, US/CR: as stored)."""
    config = tiny_config(phantom_cache)
    config.data.store = _mixed_modality_store(tmp_path)
    config.data.sampler = "micle"
    config.hybrid.supervised_weight = 0.5
    config.hybrid.num_labels = 1
    config.intensity.modality_aware = True
    config.intensity.ct_windows = ("soft_tissue",)
    config.total_steps = 2
    config.checkpoint_every = 2
    run = train.setup(config)
    batch = next(run.data_iter)
    assert batch["labels"].shape == (16, 2, 1)
    assert batch["modality_id"].shape == batch["bits_stored"].shape == batch["intensity_offset"].shape == (16, 2)
    ids = batch["modality_id"]
    assert set(np.unique(ids)) == {intensity.MODALITY_OTHER, intensity.MODALITY_CT, intensity.MODALITY_MR}  # all 16 patients
    assert np.all(batch["intensity_offset"][ids == intensity.MODALITY_CT] == 1024)  # HU + 1024 as stored
    views = batch["global"]
    unit = np.asarray(intensity.crops_to_unit(views, batch, rng=jax.random.PRNGKey(0), cfg=config.intensity))
    center, width = intensity.CT_WINDOWS["soft_tissue"]
    for b in range(views.shape[0]):
        for k in range(2):
            x = views[b, k].astype(np.float64) / 65535  # the pipeline's full-range uint16
            if ids[b, k] == intensity.MODALITY_CT:
                hu = x * (2.0 ** batch["bits_stored"][b, k] - 1) - batch["intensity_offset"][b, k]
                expected = np.clip((hu - (center - width / 2)) / width, 0, 1)
            elif ids[b, k] == intensity.MODALITY_MR:
                lo, hi = np.percentile(x, [1, 99])
                expected = np.clip((x - lo) / (hi - lo), 0, 1)
            else:
                expected = x
            np.testing.assert_allclose(unit[b, k], expected, atol=2e-5, err_msg=f"{b} {k} modality {ids[b, k]}")
    result = train.pretrain(config, str(tmp_path / "w"))
    assert result.steps_done == 2
    with open(os.path.join(str(tmp_path / "w"), "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert all(np.isfinite(line["loss"]) and np.isfinite(line["supervised_loss"]) for line in lines)


def test_hybrid_with_a_separate_contrastive_head_trains_it_from_the_global_crops(phantom_cache, tmp_path):
    # contrastive_head='separate': NT-Xent on a SimCLR projection head of its own (the two objectives share
    # only the backbone); the head exists, gets gradient, and the run logs both loss terms.
    config = tiny_config(phantom_cache)
    config.hybrid.contrastive_head = "separate"
    config.hybrid.contrastive_out_dim = 8
    config.total_steps = 2
    train.pretrain(config, str(tmp_path / "w"))
    _, state = final_state(str(tmp_path / "w"))
    assert "contrastive_head" in state["params"] and "contrastive_head" in state["batch_stats"]
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert all(np.isfinite(r["contrastive_loss"]) and np.isfinite(r["swav_loss"]) for r in rows)
    config.hybrid.contrastive_head = "both"
    with pytest.raises(ValueError, match="contrastive_head='both'"):
        swav.build(config)
