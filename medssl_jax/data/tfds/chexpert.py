"""TFDS builder for CheXpert (Irvin et al. 2019), read from a manual download.

manual_dir holds the Stanford release as unpacked, e.g. ``CheXpert-v1.0-small/`` (or
``CheXpert-v1.0/``) with ``train.csv``, ``valid.csv`` and ``train/patient00001/study1/*.jpg``;
manual_dir may also be that folder itself. CSV header: Path, Sex, Age, Frontal/Lateral, AP/PA,
No Finding, Enlarged Cardiomediastinum, Cardiomegaly, Lung Opacity, Lung Lesion, Edema,
Consolidation, Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture,
Support Devices. Paths in the CSV start with the release folder name.

Tayebi Arasteh et al. 2024: frontal images only, 10 labels, ``label != 1 -> 0`` (uncertain and blank are
negative). Splits: the official train and valid lists ('train', 'validation'); the paper's own
80/20 patient-wise split can be redrawn from patient_id.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medssl_jax.data.tfds import common

# feature name -> CSV column
LABEL_COLUMNS = {
    "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia", "atelectasis": "Atelectasis", "no_finding": "No Finding",
    "consolidation": "Consolidation", "pneumothorax": "Pneumothorax",
    "lung_opacity": "Lung Opacity", "lung_lesion": "Lung Lesion", "fracture": "Fracture",
}
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(patient\d+)/(study\d+)")


class MedsslChexpert(common.CxrBuilder):
    """CheXpert frontal chest radiographs, 10 labels (Tayebi Arasteh et al. 2024)."""

    LABELS = tuple(LABEL_COLUMNS)
    DTYPE = np.uint8
    HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    DESCRIPTION = "CheXpert frontal CXRs; labels 1 -> 1, else 0; patient ids kept."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download CheXpert (e.g. CheXpert-v1.0-small) from the Stanford AIMI site and unpack it "
        "into manual_dir, so that manual_dir/CheXpert-v1.0-small/train.csv exists.")

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        train_csv = common.find_file(root, ("train.csv",), "CheXpert")
        valid_csv = common.find_file(root, ("valid.csv",), "CheXpert")
        return {"train": self._generate_examples(train_csv),
                "validation": self._generate_examples(valid_csv)}

    def _generate_examples(self, csv_path: Path):
        dataset_dir = csv_path.parent
        items = []
        for row in common.read_csv(csv_path):
            rel = row["Path"].strip()
            if row.get("Frontal/Lateral", "").strip() != "Frontal":
                continue
            # Paths start with the release folder ('CheXpert-v1.0-small/train/...').
            path = dataset_dir.parent / rel
            if not path.is_file():
                path = dataset_dir / Path(*Path(rel).parts[1:])
            study = _STUDY.search(rel)
            items.append((rel, path, {
                "labels": [common.positive(row.get(c)) for c in LABEL_COLUMNS.values()],
                "patient_id": _PATIENT.search(rel).group(1) if _PATIENT.search(rel) else rel,
                "study_id": "/".join(study.groups()) if study else "",
                "view": row.get("AP/PA", "").strip().upper()}))
        yield from self.examples(items)
