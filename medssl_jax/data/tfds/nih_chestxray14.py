"""TFDS builder for NIH ChestX-ray14 (Wang et al. 2017), read from a manual download.

manual_dir holds the NIH release: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``;
header Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender,
View Position, OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]),
``train_val_list.txt``, ``test_list.txt`` and the PNGs in ``images/`` or in the per-archive
folders ``images_001/images/`` ... ``images_012/images/``.

Tayebi Arasteh et al. 2024: 14 labels (Infiltration is not used; 'No Finding' is), all views. Splits: the
official train_val and test lists ('train', 'test').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medssl_jax.data.tfds import common

LABEL_NAMES = {
    "cardiomegaly": "Cardiomegaly", "effusion": "Effusion", "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis", "no_finding": "No Finding", "consolidation": "Consolidation",
    "pneumothorax": "Pneumothorax", "fibrosis": "Fibrosis", "emphysema": "Emphysema",
    "hernia": "Hernia", "pleural_thickening": "Pleural_Thickening", "edema": "Edema",
    "nodule": "Nodule", "mass": "Mass",
}


class MedsslNihChestxray14(common.CxrBuilder):
    """NIH ChestX-ray14, 14 labels (Tayebi Arasteh et al. 2024), official train_val / test lists."""

    LABELS = tuple(LABEL_NAMES)
    DTYPE = np.uint8
    HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    DESCRIPTION = "NIH ChestX-ray14; 14 labels of Tayebi Arasteh et al. 2024; patient ids kept."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the NIH ChestX-ray14 files (Data_Entry_2017.csv, train_val_list.txt, "
        "test_list.txt and the images_*.tar.gz archives, unpacked) into manual_dir.")

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        entries = common.find_file(root, ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"),
                                   "ChestX-ray14")
        base = entries.parent
        index = {p.name: p for pattern in ("images/*.png", "images_*/images/*.png", "images_*/*.png")
                 for p in base.glob(pattern)}
        rows = {r["Image Index"]: r for r in common.read_csv(entries)}
        splits = {}
        for split, list_name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
            names = common.find_file(root, (list_name,), "ChestX-ray14").read_text().split()
            splits[split] = self._generate_examples(
                [(n, index.get(n, base / "images" / n), rows[n]) for n in names if n in rows])
        return splits

    def _generate_examples(self, items):
        def meta(key, path, row):
            findings = {f.strip() for f in row["Finding Labels"].split("|")}
            patient = str(int(row["Patient ID"]))
            return {"labels": [1.0 if name in findings else 0.0 for name in LABEL_NAMES.values()],
                    "patient_id": patient, "study_id": f"{patient}_{int(row['Follow-up #']):03d}",
                    "view": row.get("View Position", "").strip().upper()}

        yield from self.examples(items, meta)
