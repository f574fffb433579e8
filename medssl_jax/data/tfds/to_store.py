"""A prepared TFDS chest X-ray dataset -> a store: the one path by which the builders reach training.

Pretraining, the probe and fine-tuning read stores only, so a TFDS release is ingested once
(`python -m medssl_jax.ingest --tfds=medssl_chexpert/224 --tfds-data-dir=DIR --output=STORE`): every
element of every split becomes a record with the builder's label list (Tayebi Arasteh et al. 2024, the store's
`label_names`), its view, and salted hashes of the release's patient and study ids, so MICLe's patient
grouping and the patient-wise evaluation splits work as for any other store. TFDS 'train' /
'validation' / 'test' become the store splits 'train' / 'val' / 'test'; a release without a test
split (CheXpert) leaves the evaluation to carve one patient-wise from train, as for other stores.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
# Every builder here is a chest radiograph release; the DICOM tag is not kept by the builders.
MODALITY = "DX"


class TfdsIngestError(ValueError):
    """The TFDS dataset cannot be ingested (one line naming the input)."""


def open_builder(name: str, data_dir: str):
    """The prepared builder `name` ('medssl_chexpert/224') under `data_dir`, or a one-line error."""
    import tensorflow_datasets as tfds

    from medssl_jax.data import tfds as _registered  # noqa: F401  (registers the medssl_* builders)

    from absl import logging

    known = sorted(cls.name for cls in map(_registered.__dict__.get, _registered.__all__) if hasattr(cls, "LABELS"))
    if name.split("/")[0] not in known:
        raise TfdsIngestError(f"--tfds={name}: not one of this package's builders {known} (NAME/CONFIG, e.g. "
                              f"{known[0]}/224)")
    if not Path(data_dir).is_dir():
        raise TfdsIngestError(f"--tfds-data-dir={data_dir}: not a directory")
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # TFDS warns once per missing variant folder before failing
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as error:  # noqa: BLE001 — TFDS raises several types for an unknown name or config
        raise TfdsIngestError(f"--tfds={name}: {' '.join(str(error).split())[:200]}") from None
    finally:
        logging.set_verbosity(verbosity)
    if not prepared:
        raise TfdsIngestError(f"--tfds={name}: not prepared under --tfds-data-dir={data_dir} (run the builder's "
                              "download_and_prepare first, see README 'TFDS builders')")
    return builder


def write_store(name: str, *, data_dir: str, output: str | Path, salt: str, hash_key, overwrite: bool = False,
                store_name: str | None = None, preprocess: str = "none", size: int = 0) -> dict:
    """Writes every split of the prepared TFDS dataset `name` as the store `output` (via OUTPUT.partial).

    `hash_key(salt, kind, value)` hashes the patient and study ids (ingest's function); `preprocess`
    'tayebi' applies data/preprocess.py's `tayebi(image, size)` to every image (8-bit output).
    Returns the report also written to OUTPUT/ingest_report.json.
    """
    from medssl_jax.data import preprocess as preprocess_lib
    from medssl_jax.data.store import StoreError, StoreWriter, commit_store

    output = Path(output).absolute()
    if (output / "store.json").exists() and not overwrite:
        raise TfdsIngestError(f"--output {output}: a store already exists there; pass --overwrite to replace it")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "store.json").exists())):
        raise TfdsIngestError(f"--output {output}: exists and is not a store; choose another path")
    builder = open_builder(name, data_dir)
    label_names = list(builder.info.metadata.get("label_names", []))
    sources = builder.as_data_source()
    unknown = sorted(set(sources) - set(SPLIT_NAMES))
    if unknown:
        raise TfdsIngestError(f"--tfds={name}: splits {unknown} have no store split (known: {sorted(SPLIT_NAMES)})")
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    counts, source_id = {}, 0
    try:
        with StoreWriter(partial, name=store_name or re.sub(r"[^A-Za-z0-9_-]+", "_", output.name),
                         label_names=label_names, overwrite=True) as writer:
            for split in sorted(sources, key=list(SPLIT_NAMES).index):
                source = sources[split]
                for index in range(len(source)):
                    element = source[index]
                    image, bits = np.asarray(element["image"]), int(element["bits_stored"])
                    if preprocess == "tayebi":
                        image, bits = preprocess_lib.tayebi(image, size), 8
                    patient = _text(element["patient_id"])
                    study = _text(element["study_id"])
                    writer.add(image=np.ascontiguousarray(image), bits_stored=bits, labels=element["labels"],
                               patient=hash_key(salt, "patient", patient), view=_text(element["view"]).upper(),
                               study=hash_key(salt, "study", study) if study else "", modality=MODALITY,
                               split=SPLIT_NAMES[split], source_id=source_id)
                    source_id += 1
                counts[SPLIT_NAMES[split]] = len(source)
    except StoreError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise TfdsIngestError(str(error)) from None
    report = {"format": "medssl_jax.ingest_report", "version": 1, "mode": "tfds", "source": name,
              "label_names": label_names, "records": counts, "files_seen": source_id, "files_written": source_id,
              "records_written": source_id, "num_skipped": 0, "num_filtered": 0, "skipped": [], "filtered": [],
              "reason_counts": {}, "options": {"preprocess": preprocess, "size": size}}
    (partial / "ingest_report.json").write_text(json.dumps(report, indent=1) + "\n")
    commit_store(partial, output)
    return report


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
