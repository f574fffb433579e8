"""TFDS builder for VinDr-CXR 1.0.0 (Nguyen et al. 2022; DICOM), read from a manual download.

manual_dir holds the PhysioNet release: ``train/*.dicom``, ``test/*.dicom`` and
``annotations/`` with ``image_labels_train.csv`` / ``image_labels_test.csv`` (image_id, rad_id
(train only), one 0/1 column per finding incl. 'No finding', 'Pneumonia') and/or
``annotations_train.csv`` / ``annotations_test.csv`` (image_id, rad_id, class_name, x_min, ...).
The Kaggle competition layout (``train.csv`` with image_id, class_name, class_id, rad_id, ... and
``train/*.dicom``) also works, for the train split.

Labels: the 11 of Tayebi Arasteh et al. 2024 (LABELS below); an image is positive for a finding if any radiologist
marked it. Box-only annotation files carry no global labels, so 'Pneumonia' is 0 when only they
are present (the image_labels files are preferred). Images keep their DICOM bit depth (uint16,
MONOCHROME1 inverted). The releases carry no patient identifier, so patient_id is the DICOM
PatientID when present, else the image_id.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from absl import logging
from pydicom.errors import InvalidDicomError

from medssl_jax.data.tfds import common

LABEL_NAMES = {
    "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural effusion",
    "pneumonia": "Pneumonia", "atelectasis": "Atelectasis", "no_finding": "No finding",
    "consolidation": "Consolidation", "pneumothorax": "Pneumothorax",
    "pleural_thickening": "Pleural thickening", "lung_opacity": "Lung Opacity",
    "pulmonary_fibrosis": "Pulmonary fibrosis", "nodule_mass": "Nodule/Mass",
}


def _labels_from_table(rows) -> dict[str, set[str]]:
    """image_labels_*.csv: one 0/1 column per finding, one row per radiologist."""
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        names = found[row["image_id"]]  # images without any positive finding get an entry too
        names.update(n for n in LABEL_NAMES.values() if common.positive(row.get(n)))
    return found


def _labels_from_boxes(rows) -> dict[str, set[str]]:
    """annotations_*.csv / Kaggle train.csv: one row per (radiologist, finding[, box])."""
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[row["image_id"]].add(row["class_name"].strip())
    return found


class MedsslVindrCxr(common.CxrBuilder):
    """VinDr-CXR (DICOM), 11 labels (Tayebi Arasteh et al. 2024), official train / test."""

    LABELS = tuple(LABEL_NAMES)
    DTYPE = np.uint16
    HOMEPAGE = "https://physionet.org/content/vindr-cxr/"
    DESCRIPTION = "VinDr-CXR DICOMs (uint16, bits_stored per image); any-radiologist labels."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Credentialed PhysioNet access is required. Download vindr-cxr 1.0.0 into manual_dir, "
        "so that manual_dir/annotations/ and manual_dir/train/*.dicom exist.")

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        splits = {}
        for split in ("train", "test"):
            found = None
            for names, parse in (((f"image_labels_{split}.csv",), _labels_from_table),
                                 ((f"annotations_{split}.csv",), _labels_from_boxes),
                                 ((f"{split}.csv",), _labels_from_boxes)):
                try:
                    table = common.find_file(root, names, "VinDr-CXR")
                except FileNotFoundError:
                    continue
                if table.parent.name == "annotations":
                    base = table.parent.parent
                else:
                    base = table.parent
                found = (parse(common.read_csv(table)), base)
                break
            if found is None:
                continue
            labels, base = found
            items = [(image_id, base / split / f"{image_id}.dicom", names)
                     for image_id, names in sorted(labels.items())]
            splits[split] = self._generate_examples(items)
        if not splits:
            raise FileNotFoundError(f"VinDr-CXR: no label file (annotations/image_labels_train.csv, "
                                    f"annotations_train.csv or train.csv) in manual_dir {root}")
        return splits

    def _generate_examples(self, items):
        def meta(key, path, names):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                    "PatientID", "StudyInstanceUID", "ViewPosition"])
            except (InvalidDicomError, OSError, EOFError, ValueError) as e:
                logging.warning("skipping %s: unreadable DICOM header (%s)", path, e)
                return None
            return {"labels": [1.0 if name in names else 0.0 for name in LABEL_NAMES.values()],
                    "patient_id": str(header.get("PatientID", "") or key),
                    "study_id": str(header.get("StudyInstanceUID", "") or key),
                    "view": str(header.get("ViewPosition", "") or "").upper()}

        yield from self.examples(items, meta)
