"""TFDS builders on tiny fake copies of the public releases (real folder layout and CSV headers)."""
import csv
import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from helpers import digital_xray_dataset
from medssl_jax.data import tfds as cxr_tfds

SIZE = 16
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                   "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                   "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
CHEXPERT14 = CHEXPERT_HEADER[5:]


def _jpg(path, seed, shape=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def _write_csv(path, header, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")
    with opener as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _build(builder_cls, tmp_path, manual):
    builder = builder_cls(config=cxr_tfds.CxrConfig(size=SIZE), data_dir=str(tmp_path / "out"),
                          file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder, builder.as_data_source()


def _rows(source):
    return sorted((source[i] for i in range(len(source))), key=lambda e: e["image_id"])


def test_chexpert(tmp_path):
    manual = tmp_path / "manual"
    rel = "CheXpert-v1.0-small"
    rows = []
    labels = {c: "" for c in CHEXPERT14}
    for split, patients in (("train", (1, 2)), ("valid", (3,))):
        for p in patients:
            for view, fl in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
                path = f"{rel}/{split}/patient{p:05d}/study1/{view}.jpg"
                _jpg(manual / path, p)
                cells = dict(labels, **{"Cardiomegaly": "1.0", "Edema": "1.0",
                                        "Pleural Effusion": "-1.0", "Fracture": "0.0"})
                rows.append([path, "Female", "68", fl, "AP" if fl == "Frontal" else "", *
                             [cells[c] for c in CHEXPERT14]])
    _write_csv(manual / rel / "train.csv", CHEXPERT_HEADER, [r for r in rows if "/train/" in r[0]])
    _write_csv(manual / rel / "valid.csv", CHEXPERT_HEADER, [r for r in rows if "/valid/" in r[0]])
    builder, sources = _build(cxr_tfds.MedsslChexpert, tmp_path, manual)
    assert set(sources) == {"train", "validation"}
    train = _rows(sources["train"])
    assert len(train) == 2 and len(sources["validation"]) == 1  # frontal only
    ex = train[0]
    assert ex["image"].shape == (SIZE, SIZE) and ex["image"].dtype == np.uint8
    assert ex["patient_id"] == b"patient00001" and ex["study_id"] == b"patient00001/study1"
    assert ex["view"] == b"AP"
    names = builder.info.metadata["label_names"]
    assert len(names) == 10
    got = dict(zip(names, ex["labels"]))
    assert got["cardiomegaly"] == 1 and got["pleural_effusion"] == 0 and got["no_finding"] == 0
    # readable through the public data_source API as well
    src = tfds.data_source(f"medssl_chexpert/{SIZE}", data_dir=str(tmp_path / "out"), split="train")
    assert len(src) == 2
    _check_ingested_store(tmp_path, f"medssl_chexpert/{SIZE}", names, {"train": 2, "val": 1}, train)


def _check_ingested_store(tmp_path, name, label_names, counts, train_rows):
    """`ingest --tfds` turns the prepared dataset into a store: label list, splits, views, hashed patients."""
    from medssl_jax import ingest
    from medssl_jax.data.ingest.tasks import hash_key
    from medssl_jax.data.store import Store

    out = tmp_path / "store"
    assert ingest.main([f"--tfds={name}", f"--tfds-data-dir={tmp_path / 'out'}", f"--output={out}", "--salt=s",
                        "--quiet"]) == 0
    store = Store(out)
    assert list(store.label_names) == list(label_names)
    assert {split: len(store.ids(split)) for split in ("train", "val", "test") if len(store.ids(split))} == counts
    records = sorted((store[int(i)] for i in store.ids("train")), key=lambda r: r["patient"])
    expected = sorted(train_rows, key=lambda e: hash_key("s", "patient", e["patient_id"].decode()))
    for record, element in zip(records, expected, strict=True):
        assert record["patient"] == hash_key("s", "patient", element["patient_id"].decode())
        np.testing.assert_array_equal(record["image"], element["image"])
        np.testing.assert_array_equal(record["labels"], element["labels"])
        assert record["view"] == element["view"].decode().upper()
    assert ingest.main([f"--tfds={name}", f"--tfds-data-dir={tmp_path / 'nothing'}", f"--output={tmp_path / 'x'}",
                        "--salt=s", "--quiet"]) == 2


def test_mimic_cxr_jpg(tmp_path):
    manual = tmp_path / "manual"
    meta, split_rows, chex = [], [], []
    spec = [("10000032", "50414267", "d1", "PA", "train"), ("10000032", "50414267", "d2", "LATERAL", "train"),
            ("10000032", "53189527", "d3", "AP", "train"), ("11000011", "51111111", "d4", "PA", "validate"),
            ("12000012", "52222222", "d5", "AP", "test")]
    for subject, study, dicom_id, view, split in spec:
        _jpg(manual / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg", 1)
        meta.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544",
                     "21800506", "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split_rows.append([dicom_id, study, subject, split])
    chex_header = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                   "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                   "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
                   "Support Devices"]
    chex = [["10000032", "50414267", "", "1.0", "", "", "", "", "", "", "", "-1.0", "", "0.0", "", ""],
            ["11000011", "51111111", "", "", "", "", "", "", "", "", "1.0", "", "", "", "", ""],
            ["12000012", "52222222", "1.0", "", "", "", "", "", "", "", "", "", "", "", "", ""]]
    _write_csv(manual / "mimic-cxr-2.0.0-chexpert.csv.gz", chex_header, chex, gz=True)
    _write_csv(manual / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"], meta, gz=True)
    _write_csv(manual / "mimic-cxr-2.0.0-split.csv.gz",
               ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    builder, sources = _build(cxr_tfds.MedsslMimicCxrJpg, tmp_path, manual)
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "validation": 1, "test": 1}
    names = builder.info.metadata["label_names"]
    train = {e["image_id"]: e for e in _rows(sources["train"])}
    d1 = dict(zip(names, train[b"d1"]["labels"]))
    assert d1["cardiomegaly"] == 1 and d1["pleural_effusion"] == 0 and d1["pneumonia"] == 0
    assert np.isnan(train[b"d3"]["labels"]).all()  # study without a label row
    assert train[b"d1"]["patient_id"] == train[b"d3"]["patient_id"] == b"10000032"
    assert train[b"d1"]["study_id"] != train[b"d3"]["study_id"]


def test_nih_chestxray14(tmp_path):
    manual = tmp_path / "manual"
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]
    rows = [["00000001_000.png", "Cardiomegaly", "0", "1", "58", "M", "PA", "2682", "2749", "0.143", "0.143"],
            ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA", "2894", "2729", "0.143", "0.143"],
            ["00000002_000.png", "No Finding", "0", "2", "81", "M", "AP", "2500", "2048", "0.168", "0.168"],
            ["00000003_000.png", "Infiltration|Mass", "0", "3", "74", "F", "PA", "2500", "2048", "0.168", "0.168"]]
    with open(tmp_path / "entries.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    (manual).mkdir()
    # The real file has a trailing comma on every line.
    (manual / "Data_Entry_2017.csv").write_text(
        "\n".join(line + "," for line in (tmp_path / "entries.csv").read_text().splitlines()) + "\n")
    for k, r in enumerate(rows):
        folder = manual / ("images_001/images" if k < 2 else "images_002/images")
        img = np.random.default_rng(k).integers(0, 256, (64, 64, 4) if k == 3 else (64, 64), dtype=np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / r[0])
    (manual / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
    (manual / "test_list.txt").write_text("00000002_000.png\n")
    builder, sources = _build(cxr_tfds.MedsslNihChestxray14, tmp_path, manual)
    assert len(sources["train"]) == 3 and len(sources["test"]) == 1
    names = builder.info.metadata["label_names"]
    assert len(names) == 14 and "infiltration" not in names
    train = {e["image_id"]: e for e in _rows(sources["train"])}
    lab = dict(zip(names, train[b"00000001_001.png"]["labels"]))
    assert lab["cardiomegaly"] == lab["emphysema"] == 1 and sum(lab.values()) == 2
    assert train[b"00000003_000.png"]["labels"].sum() == 1  # Infiltration dropped, Mass kept
    assert train[b"00000001_000.png"]["patient_id"] == train[b"00000001_001.png"]["patient_id"] == b"1"
    test = _rows(sources["test"])[0]
    assert dict(zip(names, test["labels"]))["no_finding"] == 1 and test["view"] == b"AP"


def _vindr_dicom(path, seed, mono1):
    ds = digital_xray_dataset()
    ds.Modality, ds.Rows, ds.Columns = "DX", 48, 40
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    img = np.full((48, 40), 1000 + 1000 * seed, np.uint16)
    ds.PixelData = img.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_vindr_cxr(tmp_path):
    manual = tmp_path / "manual"
    ids = ["000434271f63a053c4128a0ba6352c7f", "00053190460d56c53cc3e57321387478",
           "0005e8e3701dfb1dd93d53e2ff537b6e"]
    for k, image_id in enumerate(ids[:2]):
        _vindr_dicom(manual / "train" / f"{image_id}.dicom", k, mono1=(k == 1))
    _vindr_dicom(manual / "test" / f"{ids[2]}.dicom", 2, mono1=False)
    cols = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly",
            "Clavicle fracture", "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD",
            "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst", "Mediastinal shift",
            "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
            "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor",
            "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]

    def row(*positive):
        return [1 if c in positive else 0 for c in cols]

    _write_csv(manual / "annotations" / "image_labels_train.csv", ["image_id", "rad_id"] + cols,
               [[ids[0], "R1", *row("Cardiomegaly")], [ids[0], "R2", *row("Pneumonia")],
                [ids[0], "R3", *row("No finding")], [ids[1], "R1", *row("No finding")]])
    _write_csv(manual / "annotations" / "image_labels_test.csv", ["image_id"] + cols,
               [[ids[2], *row("Nodule/Mass", "Pleural effusion")]])
    builder, sources = _build(cxr_tfds.MedsslVindrCxr, tmp_path, manual)
    names = builder.info.metadata["label_names"]
    assert len(names) == 11
    train = {e["image_id"].decode(): e for e in _rows(sources["train"])}
    a = dict(zip(names, train[ids[0]]["labels"]))
    assert a["cardiomegaly"] == a["pneumonia"] == a["no_finding"] == 1 and sum(a.values()) == 3
    img0, img1 = train[ids[0]]["image"], train[ids[1]]["image"]
    assert img0.dtype == np.uint16 and img0.shape == (SIZE, SIZE)
    assert train[ids[0]]["bits_stored"] == 14
    assert (img0 == 1000).all() and (img1 == 2 ** 14 - 1 - 2000).all()  # MONOCHROME1 inverted
    test = _rows(sources["test"])[0]
    assert dict(zip(names, test["labels"]))["nodule_mass"] == 1
    assert test["patient_id"] == ids[2].encode()  # no PatientID in the file -> image_id


def test_missing_label_file_is_clear(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README.txt").write_text("not the release")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        _build(cxr_tfds.MedsslChexpert, tmp_path, tmp_path / "manual")
