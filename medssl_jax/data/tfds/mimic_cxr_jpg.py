"""TFDS builder for MIMIC-CXR-JPG 2.0.0/2.1.0 (PhysioNet), read from a manual download.

manual_dir holds the PhysioNet release (``physionet.org/files/mimic-cxr-jpg/2.x.0/`` contents):
``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (subject_id, study_id, Atelectasis, Cardiomegaly, ...,
No Finding, ...), ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (dicom_id, subject_id, study_id, ...,
ViewPosition, ...), ``mimic-cxr-2.0.0-split.csv[.gz]`` (dicom_id, study_id, subject_id, split)
and ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``.

Tayebi Arasteh et al. 2024: PA and AP views, the 7 labels active in the paper's code, ``label != 1 -> 0``.
Images of studies without a row in the CheXpert label file get NaN labels (no labels were
extracted for them; they still serve self-supervised pretraining). Splits: the official
train / validate / test ('train', 'validation', 'test').
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medssl_jax.data.tfds import common

LABEL_COLUMNS = {
    "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia", "atelectasis": "Atelectasis", "no_finding": "No Finding",
    "consolidation": "Consolidation", "pneumothorax": "Pneumothorax",
}
VIEWS = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}


def _csv(root: Path, stem: str) -> Path:
    return common.find_file(root, (f"{stem}.csv", f"{stem}.csv.gz"), "MIMIC-CXR-JPG")


class MedsslMimicCxrJpg(common.CxrBuilder):
    """MIMIC-CXR-JPG PA/AP chest radiographs, 7 labels (Tayebi Arasteh et al. 2024)."""

    LABELS = tuple(LABEL_COLUMNS)
    DTYPE = np.uint8
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
    DESCRIPTION = "MIMIC-CXR-JPG PA/AP CXRs; labels 1 -> 1, else 0; subject ids kept."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Credentialed PhysioNet access is required. Download mimic-cxr-jpg (the CSV files and "
        "files/) into manual_dir, so that manual_dir/mimic-cxr-2.0.0-split.csv.gz and "
        "manual_dir/files/p10/... exist.")

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        split_csv = _csv(root, "mimic-cxr-2.0.0-split")
        base = split_csv.parent
        meta = {r["dicom_id"]: r for r in common.read_csv(_csv(root, "mimic-cxr-2.0.0-metadata"))}
        labels = {(r["subject_id"], r["study_id"]): r
                  for r in common.read_csv(_csv(root, "mimic-cxr-2.0.0-chexpert"))}
        by_split: dict[str, list] = {name: [] for name in _SPLITS.values()}
        for row in common.read_csv(split_csv):
            m = meta.get(row["dicom_id"])
            view = (m or {}).get("ViewPosition", "").strip().upper()
            if view not in VIEWS or row["split"] not in _SPLITS:
                continue
            subject, study = row["subject_id"], row["study_id"]
            path = (base / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
                    / f"{row['dicom_id']}.jpg")
            lab = labels.get((subject, study))
            values = ([common.positive(lab.get(c)) for c in LABEL_COLUMNS.values()] if lab
                      else [math.nan] * len(LABEL_COLUMNS))
            by_split[_SPLITS[row["split"]]].append((row["dicom_id"], path, {
                "labels": values, "patient_id": subject, "study_id": study, "view": view}))
        return {name: self._generate_examples(items) for name, items in by_split.items() if items}

    def _generate_examples(self, items):
        yield from self.examples(items)
