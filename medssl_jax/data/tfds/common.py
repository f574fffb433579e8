"""Shared pieces of the chest X-ray TFDS builders: configs, features, CSV and image helpers.

The builders read a manually downloaded copy of a public dataset (``manual_dir``) and write
ArrayRecord shards (``file_format="array_record"``) that Grain reads through ``tfds.data_source``.
TensorFlow is not needed: pixels are ``tfds.features.Tensor`` (zlib-compressed), never
``tfds.features.Image`` (whose encoder calls TensorFlow).

Preprocessing follows Tayebi Arasteh et al. 2024 (their released code) where it concerns content: the paper's label lists, label
policy (``label != 1 -> 0``) and view filters, and a resize to ``size x size`` (the paper squashes
to a square). Intensities are stored as decoded (MONOCHROME1 inverted for DICOM), without the
paper's min-max + histogram equalisation, so that augmentation and normalisation stay in the
training pipeline (ingesting into a store with ``ingest --preprocess=tayebi`` applies them). Patient ids of these public releases are already de-identified and are kept
verbatim for MICLe grouping and patient-wise splits.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medssl_jax.data import dicom, images


class CxrConfig(tfds.core.BuilderConfig):
    """A stored resolution: images are resized (anti-aliased) to size x size."""

    def __init__(self, *, size: int, name: str | None = None, **kwargs):
        super().__init__(name=name or str(size), description=f"{size}x{size} pixels", **kwargs)
        self.size = size


class CxrBuilder(tfds.core.GeneratorBasedBuilder):
    """Base class: subclasses set LABELS, DTYPE, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS and
    implement _split_generators / _generate_examples using `example`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: 3(d) label lists and policy, patient ids kept."}
    BUILDER_CONFIGS = [CxrConfig(size=224), CxrConfig(size=512)]
    LABELS: tuple[str, ...] = ()
    DTYPE = np.uint8
    HOMEPAGE = ""
    DESCRIPTION = ""

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size), dtype=self.DTYPE,
                                              encoding=tfds.features.Encoding.ZLIB),
                "bits_stored": tfds.features.Tensor(shape=(), dtype=np.int32),
                "labels": tfds.features.Tensor(shape=(len(self.LABELS),), dtype=np.float32),
                "patient_id": tfds.features.Text(),
                "study_id": tfds.features.Text(),
                "view": tfds.features.Text(),
                "image_id": tfds.features.Text(),
            }),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(label_names=list(self.LABELS)),
        )

    def load_image(self, path: Path) -> tuple[np.ndarray, int] | None:
        """File -> (size x size array of DTYPE, bits_stored), or None (logged) if unreadable."""
        size = self.builder_config.size
        try:
            if dicom.sniff(path) in ("dicom", "raw"):
                (frame,) = dicom.read_dicom(path, size=None, frames="first", skip_burned_in=False)
                img, bits = frame.image, frame.bits_stored
            else:
                img, bits = images.read_image(path, color="gray")
        except (dicom.SkipFile, images.ImageError) as e:
            logging.warning("skipping %s: %s", path, e)
            return None
        img = images.resize_to(img, (size, size), max_value=2 ** bits - 1)
        if img.dtype != self.DTYPE:
            if np.dtype(self.DTYPE).itemsize < img.dtype.itemsize:
                # 16-bit source into an 8-bit dataset: keep the top 8 significant bits.
                img = (img.astype(np.uint32) >> max(bits - 8, 0)).astype(self.DTYPE)
                bits = min(bits, 8)
            else:
                img = img.astype(self.DTYPE)
        return img, bits

    def example(self, path: Path, *, labels, patient_id: str, study_id: str, view: str,
                image_id: str) -> dict | None:
        loaded = self.load_image(path)
        if loaded is None:
            return None
        img, bits = loaded
        return {"image": img, "bits_stored": np.int32(bits),
                "labels": np.asarray(labels, np.float32), "patient_id": str(patient_id),
                "study_id": str(study_id), "view": str(view), "image_id": str(image_id)}

    def examples(self, items, meta=None):
        """(key, example) for every item (key, path, x) whose file exists and reads: `meta(key, path, x)`
        gives `example`'s labels, patient_id, study_id and view (None skips the item); without `meta`,
        x is that dict already."""
        for key, path, x in iter_existing(items):
            fields = x if meta is None else meta(key, path, x)
            if fields is None:
                continue
            ex = self.example(path, image_id=key, **fields)
            if ex is not None:
                yield key, ex


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV (or .csv.gz, as PhysioNet ships them) -> list of row dicts."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def find_file(root: Path, names: tuple[str, ...], what: str) -> Path:
    """First of names found in root or one folder below (releases unpack into a subfolder)."""
    for name in names:
        for candidate in [root / name, *sorted(root.glob(f"*/{name}"))]:
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{what}: none of {list(names)} found in manual_dir {root} "
                            "(or one folder below)")


def positive(value: str | None) -> float:
    """3(d) policy for CheXpert-style cells: 1 -> 1, anything else (0, -1 uncertain, blank) -> 0."""
    try:
        return 1.0 if value is not None and value.strip() and float(value) == 1.0 else 0.0
    except ValueError:
        return 0.0


def iter_existing(items: list[tuple[str, Path, dict]]) -> Iterator[tuple[str, Path, dict]]:
    """Yields the items whose file exists, logging the missing ones (partial downloads)."""
    missing = 0
    for key, path, meta in items:
        if path.is_file():
            yield key, path, meta
        else:
            missing += 1
            if missing <= 10:
                logging.warning("missing image file %s", path)
    if missing:
        logging.warning("%d listed images were missing from manual_dir and were skipped", missing)
