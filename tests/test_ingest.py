"""Ingestion end to end: every pydicom test file accounted for, PHI never written, bad files
reported, reruns refused or replaced atomically, CSV mode with 8/16-bit PNGs and label policies."""
import csv
import json
import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from helpers import digital_xray_dataset
from medssl_jax import ingest
from medssl_jax.data.ingest import benchmark as ingest_benchmark, run as ingest_run, tasks as ingest_tasks
from medssl_jax.data.store import Store, StoreError

PYDICOM_DIR = os.path.dirname(get_testdata_file("CT_small.dcm"))
_RG1 = get_testdata_file("RG1_UNCR.dcm", download=False)
PYDICOM_DATA_DIR = os.path.dirname(_RG1) if _RG1 else None


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def _sources(store_path):
    with open(str(store_path) + ".sources.csv") as f:
        return list(csv.DictReader(f))


def _check_accounted(root, store_path, report):
    files = _all_files(root)
    assert report["files_seen"] == len(files)
    listed = [e["path"] for e in report["skipped"] + report["filtered"]]
    written = {os.path.relpath(r["path"], root) for r in _sources(store_path)}
    assert len(written) == report["files_written"]
    assert sorted(listed + sorted(written)) == files  # each file exactly once: written or listed
    return written, {e["path"]: e["reason"] for e in report["skipped"]}


def _run(argv):
    code = ingest.main(argv + ["--quiet"])
    return code


def test_pydicom_wheel_corpus(tmp_path):
    out = tmp_path / "store"
    assert _run([f"--input={PYDICOM_DIR}", f"--output={out}", "--size=64", "--workers=2"]) == 1
    assert _run([f"--input={PYDICOM_DIR}", f"--output={out}", "--size=64", "--workers=2",
                 "--allow-skips", "--overwrite"]) == 0
    report = json.loads((out / "ingest_report.json").read_text())
    written, skipped = _check_accounted(PYDICOM_DIR, out, report)
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "693_J2KI.dcm",
                 "examples_ybr_color.dcm", "examples_palette.dcm", "image_dfl.dcm",
                 "dicomdirtests/77654033/CR1/6154", "SC_rgb_rle_16bit.dcm"):
        assert name in written, name
    expected = {"MR_truncated.dcm": "truncated", "JPGExtended.dcm": "12-bit JPEG Extended",
                "test-SR.dcm": "non-image object", "rtdose.dcm": "non-image object",
                "README.txt": "not DICOM", "dicomdirtests/DICOMDIR": "DICOMDIR",
                "no_meta.dcm": "not DICOM", "waveform_ecg.dcm": "non-image object",
                "JPEG2000-embedded-sequence-delimiter.dcm": "could not be decoded"}
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped[name])
    store = Store(out)
    assert store.num_records == report["records_written"]
    by_path = {os.path.relpath(r["path"], PYDICOM_DIR): int(r["record_id"]) for r in _sources(out)}
    ct = store[by_path["CT_small.dcm"]]
    assert ct["modality"] == "CT" and ct["intensity_offset"] == 1024 and ct["image"].shape == (64, 64)
    ybr = [int(r["record_id"]) for r in _sources(out) if r["path"].endswith("examples_ybr_color.dcm")]
    assert len(ybr) == 30 and sorted(store[i]["frame"] for i in ybr) == list(range(30))
    for i in range(store.num_records):
        rec = store[i]
        assert max(rec["image"].shape[:2]) <= 64
        assert int(rec["image"].max()) < 2 ** rec["bits_stored"]
    # the report and the store hold no absolute paths
    blob = b"".join(p.read_bytes() for p in out.iterdir())
    assert PYDICOM_DIR.encode() not in blob


@pytest.mark.skipif(PYDICOM_DATA_DIR is None, reason="pydicom-data not installed")
def test_pydicom_data_real_files(tmp_path):
    out = tmp_path / "store"
    assert _run([f"--input={PYDICOM_DATA_DIR}", f"--output={out}", "--size=64", "--workers=2",
                 "--allow-skips"]) == 0
    report = json.loads((out / "ingest_report.json").read_text())
    written, skipped = _check_accounted(PYDICOM_DATA_DIR, out, report)
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm", "MR2_J2KR.dcm",
                 "693_UNCR.dcm", "US1_J2KR.dcm", "eCT_Supplemental.dcm", "emri_small_RLE.dcm",
                 "color3d_jpeg_baseline.dcm", "OT-PAL-8-face.dcm", "vlut_04.dcm", "mlut_18.dcm"):
        assert name in written, name
    assert set(skipped) <= {"liver.dcm", "liver_expb.dcm",
                            "emri_small_jpeg_2k_lossless_too_short.dcm"}, skipped
    store = Store(out)
    rec = {os.path.basename(r["path"]): store[int(r["record_id"])] for r in _sources(out)}
    chest = rec["RG1_UNCR.dcm"]
    assert chest["modality"] == "CR" and chest["image"].shape == (64, 60)
    assert chest["bits_stored"] == 15 and chest["image"].dtype == np.uint16
    # MONOCHROME1 inverted: lungs (dark) sit in the middle rows, the bright mediastinum between
    # them; in the raw MONOCHROME1 data the relation is the reverse.
    lungs = chest["image"][20:40, [12, 48]].mean()
    mediastinum = chest["image"][20:40, 28:32].mean()
    assert mediastinum > lungs
    lossless = rec["RG1_J2KR.dcm"]["image"].astype(int)
    assert np.abs(lossless - chest["image"].astype(int)).max() <= 1


@pytest.mark.skipif(_RG1 is None, reason="pydicom-data not installed")
def test_tayebi_preprocessing_of_a_real_monochrome1_radiograph_is_their_pipeline(tmp_path, capsys):
    import scipy.ndimage

    from medssl_jax.data import preprocess

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_RG1, src / "chest.dcm")  # CR, MONOCHROME1, 1955 x 1841, 15 bits
    out = tmp_path / "store"
    assert _run([f"--input={src}", f"--output={out}", "--size=32", "--workers=1", "--preprocess=tayebi"]) == 0
    record = Store(out)[0]
    assert record["image"].shape == (32, 32) and record["image"].dtype == np.uint8  # square, not 32 x 30
    assert record["bits_stored"] == 8 and record["image"].min() == 0 and record["image"].max() == 255
    # Their order on the raw pixel array (zoom, min-max, 8 bit, THEN invert MONOCHROME1, equalise) gives the
    # same pixels as ours (inverted when read): every one of the 1024.
    raw = pydicom.dcmread(_RG1).pixel_array
    unit = scipy.ndimage.zoom(raw, np.divide((32, 32), raw.shape), order=2).astype(np.float64)
    unit = (unit - unit.min()) / (unit.max() - unit.min())
    theirs = preprocess.equalize_hist(np.invert(preprocess.to_ubyte(unit)))
    np.testing.assert_array_equal(record["image"], theirs)
    assert record["image"][10:20, 14:18].mean() > record["image"][10:20, [6, 26]].mean()  # mediastinum brighter
    assert json.loads((out / "ingest_report.json").read_text())["options"]["preprocess"] == "tayebi"
    capsys.readouterr()
    assert _run([f"--input={src}", f"--output={tmp_path / 'rgb'}", "--size=32", "--color=rgb",
                 "--preprocess=tayebi"]) == 2
    assert "--preprocess=tayebi: needs the square target size" in capsys.readouterr().err


def _phi_dataset(path, *, name, pid, birth, accession, study_uid):
    ds = digital_xray_dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    ds.AccessionNumber, ds.StudyInstanceUID = accession, study_uid
    ds.InstitutionName, ds.ReferringPhysicianName = "Zyxwvu Memorial Hospital", "Qwertz^Doctor"
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = 40, 30
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (40, 30), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_no_phi_in_any_output_byte(tmp_path, capsys):
    src = tmp_path / "in"
    phi = []
    for p in range(3):
        sub = src / f"export{p}"
        sub.mkdir(parents=True)
        values = dict(name=f"Doeuniq{p}^Janeuniq{p}", pid=f"PID-98765-{p}", birth=f"1931020{p}",
                      accession=f"ACC55544{p}", study_uid=f"1.2.826.0.1.3680043.99.{p}")
        phi += [values["name"], values["name"].split("^")[0], values["pid"], values["birth"],
                values["accession"], values["study_uid"]]
        for k in range(2):
            _phi_dataset(sub / f"im{k}.dcm", **values)
    # A folder named after the patient (as PACS exports do) plus a broken file inside it.
    named = src / "Doeuniq9^Janeuniq9"
    named.mkdir()
    (named / "broken.dcm").write_bytes(b"not a dicom file")
    phi += ["Doeuniq9", "Zyxwvu", "Qwertz"]
    out = tmp_path / "store"
    code = _run([f"--input={src}", f"--output={out}", "--workers=1", "--redact-paths",
                 "--allow-skips", "--val-fraction=0.3"])
    assert code == 0
    captured = capsys.readouterr()
    store = Store(out)
    assert store.num_records == 6 and len(set(store.patients)) == 3
    assert len(set(store.studies)) == 3
    # Shards are zstd-compressed, so also search the decompressed records.
    from array_record.python.array_record_module import ArrayRecordReader
    blobs = {f.name: f.read_bytes() for f in out.iterdir()}
    for path in store.shard_paths:
        blobs[path + " (records)"] = b"".join(ArrayRecordReader(path).read_all())
    assert len(blobs) == 5  # store.json, index.npz, 1 shard (+ its records), ingest_report.json
    for name, data in blobs.items():
        for s in phi:
            assert s.encode() not in data, (name, s)
    for s in phi:
        assert s not in captured.out + captured.err
    assert not (out / "store.salt").exists() and (tmp_path / "store.salt").exists()
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["skipped"] == [{"path": "source:0", "reason": report["skipped"][0]["reason"]}]
    # the sensitive mapping file, outside the store, is the only place with full paths
    sources = (tmp_path / "store.sources.csv").read_text()
    assert str(src / "export0" / "im0.dcm") in sources and "Doeuniq9" not in sources
    # same salt file reused on a rerun: identical keys
    out2 = tmp_path / "store"
    assert _run([f"--input={src}", f"--output={out2}", "--workers=1", "--allow-skips",
                 "--overwrite"]) == 0
    assert sorted(Store(out2).patients) == sorted(store.patients)


def test_corrupted_inputs_and_exit_codes(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    good = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (src / "good.dcm").write_bytes(good)
    (src / "truncated.dcm").write_bytes(good[: len(good) - 5000])
    (src / "headonly.dcm").write_bytes(good[:700])
    (src / "zero.dcm").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "picture.png")
    out = tmp_path / "store"
    assert _run([f"--input={src}", f"--output={out}", "--workers=1"]) == 1
    err = capsys.readouterr()
    assert "4 skipped" in err.out and "--allow-skips" in err.err
    report = json.loads((out / "ingest_report.json").read_text())
    reasons = {e["path"]: e["reason"] for e in report["skipped"]}
    assert set(reasons) == {"truncated.dcm", "headonly.dcm", "zero.dcm", "picture.png"}
    assert "truncated" in reasons["truncated.dcm"] and "not DICOM" in reasons["picture.png"]
    assert Store(out).num_records == 1


def test_rerun_refuses_overwrite_replaces_and_interrupt_leaves_no_store(tmp_path, monkeypatch,
                                                                          capsys):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        _phi_dataset(src / f"im{k}.dcm", name="A^B", pid=f"P{k}", birth="19000101", accession="1",
                     study_uid=f"1.2.3.{k}")
    out = tmp_path / "store"
    assert _run([f"--input={src}", f"--output={out}", "--workers=1"]) == 0
    assert _run([f"--input={src}", f"--output={out}", "--workers=1"]) == 2
    assert "already exists" in capsys.readouterr().err

    calls = {"n": 0}
    real = ingest_run.process_task

    def flaky(task, opts=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(task, opts)

    monkeypatch.setattr(ingest_run, "process_task", flaky)
    assert _run([f"--input={src}", f"--output={out}", "--workers=1", "--overwrite"]) == 130
    assert Store(out).num_records == 3  # the old complete store is untouched
    partial = tmp_path / "store.partial"
    with pytest.raises(StoreError):
        Store(partial)
    monkeypatch.setattr(ingest_run, "process_task", real)
    (src / "im3.dcm").write_bytes((src / "im0.dcm").read_bytes())
    assert _run([f"--input={src}", f"--output={out}", "--workers=1", "--overwrite"]) == 0
    assert Store(out).num_records == 4 and not partial.exists()


def test_csv_mode_png_8_and_16_bit(tmp_path):
    root = tmp_path / "imgs"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 80), dtype=np.uint8)).save(root / "p1" / "a.png")
    Image.fromarray(rng.integers(0, 65536, (60, 120), dtype=np.uint16)).save(root / "p1" / "b.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(root / "p2" / "c.jpg")
    rows = [["path", "patient", "study", "view", "split", "Sex", "Age", "Edema", "Effusion"],
            ["p1/a.png", "pat1", "s1", "PA", "train", "F", "63", "1", "-1"],
            ["p1/b.png", "pat1", "s1", "lateral", "valid", "F", "63", "", "0"],
            ["p2/c.jpg", "pat2", "", "AP", "test", "M", "40", "0", "1.0"],
            ["p2/missing.png", "pat2", "", "AP", "", "M", "40", "0", "1"]]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "store"
    base = [f"--csv={tmp_path / 'labels.csv'}", f"--image-root={root}", "--size=64",
            "--workers=1", "--allow-skips"]
    assert _run(base + [f"--output={out}"]) == 0
    store = Store(out)
    assert store.label_names == ["Edema", "Effusion"]  # Sex/Age are not label-like
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["skipped"] == [{"path": "p2/missing.png", "reason": "file not found"}]
    recs = [store[i] for i in range(3)]
    assert recs[0]["image"].dtype == np.uint8 and recs[0]["bits_stored"] == 8
    assert recs[0]["image"].shape == (64, 51)
    assert recs[1]["image"].dtype == np.uint16 and recs[1]["bits_stored"] == 16
    assert recs[1]["image"].shape == (32, 64) and recs[1]["view"] == "LATERAL"
    assert recs[2]["image"].shape == (50, 50)  # never upscaled; colour -> gray
    np.testing.assert_array_equal(store.labels, [[1, 0], [0, 0], [0, 1]])  # U-zeros, blank -> 0
    assert list(store.splits) == ["train", "val", "test"]
    assert store.patients[0] == store.patients[1] != store.patients[2]
    assert "pat1" not in store.patients[0]

    out2 = tmp_path / "store2"
    assert _run(base + [f"--output={out2}", "--uncertain=missing", "--missing=missing",
                        "--view=PA,AP", "--labels=Effusion"]) == 0
    s2 = Store(out2)
    assert s2.label_names == ["Effusion"] and s2.num_records == 2
    np.testing.assert_array_equal(s2.labels, [[np.nan], [1]])
    report2 = json.loads((out2 / "ingest_report.json").read_text())
    assert [e["path"] for e in report2["filtered"]] == ["p1/b.png"]


def test_csv_bad_column_is_one_line_error(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("file,pid\na.png,1\n")
    assert _run([f"--csv={tmp_path / 'x.csv'}", f"--output={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no column 'path'" in err


def test_benchmark_smoke(tmp_path):
    rows = ingest_benchmark.benchmark(n_files=2, size=64, store_size=32, workers=(1,), workdir=str(tmp_path))
    assert [(r["syntax"], r["workers"], r["files"]) for r in rows] == [
        ("uncompressed", 1, 2), ("jpeg2000", 1, 2)]
    assert all(r["files_per_s"] > 0 for r in rows)


def test_output_inside_input_and_missing_input_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert _run([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'in' / 'store'}"]) == 2
    assert _run([f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "inside --input" in err[0] and "not a directory" in err[1]


def test_salt_file_and_salt_give_the_same_keys(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _phi_dataset(src / "a.dcm", name="A^B", pid="P1", birth="19000101", accession="1",
                 study_uid="1.2.3")
    (tmp_path / "secret").write_text("s3cret\n")
    assert _run([f"--input={src}", f"--output={tmp_path / 'a'}", "--workers=1",
                 f"--salt-file={tmp_path / 'secret'}"]) == 0
    assert _run([f"--input={src}", f"--output={tmp_path / 'b'}", "--workers=1", "--salt=s3cret"]) == 0
    assert not (tmp_path / "a.salt").exists() and not (tmp_path / "b.salt").exists()
    assert Store(tmp_path / "a").patients[0] == Store(tmp_path / "b").patients[0] == \
        ingest_tasks.hash_key("s3cret", "patient", "P1")


def test_csv_chexpert_layout_with_path_regexes(tmp_path):
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly",
              "Pleural Effusion"]
    rows = []
    for p, s, v in ((1, 1, "view1_frontal"), (1, 1, "view2_lateral"), (1, 2, "view1_frontal"),
                    (2, 1, "view1_frontal")):
        rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/{v}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 16), 40 * p, np.uint8)).save(tmp_path / rel)
        rows.append([rel, "Male", "50", "Frontal" if "frontal" in v else "Lateral",
                     "PA" if "frontal" in v else "", *(("1.0", "", "") if p == 2 else
                                                       ("", "1.0", "-1.0"))])
    csv_path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    out = tmp_path / "store"
    assert _run([f"--csv={csv_path}", f"--image-root={tmp_path}", f"--output={out}",
                 "--path-column=Path", "--view-column=AP/PA", r"--patient-regex=(patient\d+)",
                 r"--study-regex=(patient\d+/study\d+)", "--workers=1"]) == 0
    store = Store(out)
    assert store.label_names == ["No Finding", "Cardiomegaly", "Pleural Effusion"]
    np.testing.assert_array_equal(store.labels[[0, 3]], [[0, 1, 0], [1, 0, 0]])
    assert len(set(store.patients)) == 2 and len(set(store.studies)) == 3
    assert store.patients[0] == store.patients[2] and store.studies[0] == store.studies[1]
    assert list(store.views) == ["PA", "", "PA", "PA"]


def test_progress_line_has_rate_and_eta(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    assert ingest.main([f"--input={src}", f"--output={tmp_path / 's'}", "--workers=1"]) == 0
    captured = capsys.readouterr()
    assert "1/1 files" in captured.err and "files/s" in captured.err and "ETA" in captured.err
    assert captured.out.startswith("ingest: 1 files seen, 1 written (1 records), 0 skipped")


def _png_tree(root, names):
    rng = np.random.default_rng(1)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / name)


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_fifo_in_the_input_folder_is_skipped_not_read(tmp_path):
    import threading

    root = tmp_path / "in"
    root.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(root / "ct.dcm")
    os.mkfifo(root / "pipe")
    out = tmp_path / "store"
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=_run(
        [f"--input={root}", f"--output={out}", "--size=32", "--workers=1", "--allow-skips"])))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "ingest hung on a FIFO"
    assert result["code"] == 0
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["files_written"] == 1
    assert report["skipped"] == [{"path": "pipe", "reason": "not a regular file (FIFO); skipped without reading"}]


def test_csv_listing_one_image_twice_is_refused(tmp_path, capsys):
    _png_tree(tmp_path / "img", ["a.png", "b.png"])
    _csv(tmp_path / "x.csv", [["path", "patient", "Edema"], ["a.png", "p1", "1"], ["b.png", "p2", "0"],
                              ["./a.png", "p3", "0"]])
    assert _run([f"--csv={tmp_path / 'x.csv'}", f"--image-root={tmp_path / 'img'}",
                 f"--output={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "listed more than once" in err and "rows 2, 4" in err
    assert "under 2 different patients" in err and not (tmp_path / "s").exists()


def test_one_bad_label_cell_names_its_column_and_row(tmp_path, capsys):
    _png_tree(tmp_path / "img", [f"{i}.png" for i in range(12)])
    rows = [["path", "patient", "Edema"]] + [[f"{i}.png", f"p{i}", str(i % 2)] for i in range(12)]
    rows[5][2] = "maybe"
    _csv(tmp_path / "x.csv", rows)
    base = [f"--csv={tmp_path / 'x.csv'}", f"--image-root={tmp_path / 'img'}"]
    assert _run(base + [f"--output={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "column 'Edema'" in err and "row 6 has 'maybe'" in err and "--labels" in err


def test_non_utf8_or_binary_csv_is_one_line_with_the_line_number(tmp_path, capsys):
    (tmp_path / "latin1.csv").write_bytes("path,patient\na.png,p1\nb.png,Müller\n".encode("latin-1"))
    assert _run([f"--csv={tmp_path / 'latin1.csv'}", f"--output={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 3 is not UTF-8" in err
    (tmp_path / "binary.csv").write_bytes(b"path,patient\n\x00\x01\x02")
    assert _run([f"--csv={tmp_path / 'binary.csv'}", f"--output={tmp_path / 's'}"]) == 2
    assert "line 2 contains a NUL byte" in capsys.readouterr().err


def test_redact_paths_leaves_no_patient_folder_name_in_the_report(tmp_path):
    # Folders named after patients; a missing file, an undecodable one and an unreadable one produce
    # library messages that quote the absolute path.
    root = tmp_path / "PACS" / "SMITH^JOHN_1962"
    _png_tree(root, ["ok.png"])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "locked.png").write_bytes(b"x")
    os.chmod(root / "locked.png", 0)
    _csv(tmp_path / "x.csv", [["path", "patient"], ["SMITH^JOHN_1962/ok.png", "p1"],
                              ["SMITH^JOHN_1962/broken.png", "p2"], ["SMITH^JOHN_1962/gone.png", "p3"],
                              ["SMITH^JOHN_1962/locked.png", "p4"]])
    out = tmp_path / "store"
    assert _run([f"--csv={tmp_path / 'x.csv'}", f"--image-root={tmp_path / 'PACS'}", f"--output={out}",
                 "--workers=1", "--allow-skips", "--redact-paths"]) == 0
    text = (out / "ingest_report.json").read_text()
    assert "SMITH" not in text and str(tmp_path) not in text
    assert len(json.loads(text)["skipped"]) == 3
    assert oct(os.stat(str(out) + ".sources.csv").st_mode & 0o777) == "0o600"
