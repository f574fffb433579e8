"""The arguments of `python -m medssl_jax.ingest` (cli.py runs them; benchmark.py builds its runs with them).
"""

from __future__ import annotations

import argparse

from medssl_jax.data import dicom, preprocess
from medssl_jax.data.ingest.tasks import CSV_COLUMN_DEFAULTS, MISSING_POLICIES, UNCERTAIN_POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medssl_jax.ingest",
        description="Ingest a DICOM folder or a PNG/JPEG+CSV dataset into a medssl_jax image store.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="folder walked recursively for DICOM files (by content)")
    src.add_argument("--csv", help="CSV with one row per image (path, patient, labels ...)")
    src.add_argument("--tfds", metavar="NAME/CONFIG", help="a prepared TFDS dataset of medssl_jax.data.tfds, e.g. "
                     "medssl_chexpert/224 (with --tfds-data-dir); its splits and label list go into the store")
    src.add_argument("--medmnist", help="a MedMNIST v2 .npz file (official train/val/test splits kept; "
                     "see medssl_jax/data/medmnist.py)")
    src.add_argument("--verify", metavar="STORE", help="read and decode every record of STORE and list the "
                     "damaged ones (exit 1 if any)")
    src.add_argument("--benchmark", action="store_true",
                     help="measure files/s on generated 512x512 16-bit DICOM and exit")
    p.add_argument("--output", help="store directory to create (STORE)")
    p.add_argument("--tfds-data-dir", help="--tfds: the data_dir the builder was prepared into")
    p.add_argument("--image-root", help="CSV mode: folder the CSV paths are relative to "
                   "(default: the CSV's folder)")
    p.add_argument("--name", help="store name used in shard file names (default: from --output)")
    p.add_argument("--size", type=int, default=512,
                   help="longest side after an anti-aliased, aspect-keeping resize; 0 = native "
                   "(default 512; smaller images are never upscaled)")
    p.add_argument("--preprocess", choices=preprocess.PREPROCESSINGS, default="none",
                   help="a paper's offline preprocessing instead of the plain resize: 'tayebi' = Tayebi Arasteh "
                   "et al. 2024 (square --size x --size spline resize, min-max to 8 bits, MONOCHROME1 "
                   "inverted, global histogram equalisation; medssl_jax/data/preprocess.py)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--frames", choices=dicom.FRAME_MODES, default="all",
                   help="multi-frame objects: a record per frame, or only the first/middle one")
    p.add_argument("--color", choices=dicom.COLOR_MODES, default="gray",
                   help="colour images: convert to grayscale luma or keep 3 channels")
    p.add_argument("--modality", help="keep only these modalities, e.g. CR,DX")
    p.add_argument("--view", help="keep only these views (DICOM ViewPosition / CSV view), e.g. PA,AP")
    p.add_argument("--salt", help="secret salt for the patient/study hashes (default: reuse or "
                   "generate STORE.salt next to the store)")
    p.add_argument("--salt-file", help="read the salt from this file (keeps it out of shell "
                   "history and process lists)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of patients put in split 'val' (by salted hash)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="fraction of patients put in split 'test' (by salted hash)")
    p.add_argument("--keep-burned-in", action="store_true",
                   help="also ingest DICOM images marked BurnedInAnnotation=YES (may show PHI)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--allow-skips", action="store_true",
                   help="exit 0 even if some files were skipped")
    p.add_argument("--redact-paths", action="store_true",
                   help="report skipped files as source:ID only (look them up in STORE.sources.csv)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    g = p.add_argument_group("CSV mode")
    for opt, default in CSV_COLUMN_DEFAULTS.items():
        g.add_argument("--" + opt.replace("_", "-"), default=default,
                       help=f"column name (default {default!r})")
    g.add_argument("--patient-regex", help="take the patient id from the path instead of a column, "
                   r"e.g. '(patient\d+)' for CheXpert (first group, else the whole match)")
    g.add_argument("--study-regex", help=r"take the study id from the path, e.g. '(patient\d+/study\d+)'")
    g.add_argument("--labels", help="comma-separated label columns (default: every other column "
                   "whose cells are all 1, 0, -1 or blank)")
    g.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="zeros",
                   help="-1 (uncertain) labels: zeros (U-zeros, default: Tayebi Arasteh et al. 2024 "
                   "'label != 1 -> 0'), ones, missing (NaN) or keep (-1)")
    g.add_argument("--missing", choices=MISSING_POLICIES, default="zeros",
                   help="blank labels: zeros (default, as 3(d)) or missing (NaN)")
    g.add_argument("--default-modality", default="OT",
                   help="modality recorded for PNG/JPEG files (default OT)")
    m = p.add_argument_group("MedMNIST mode")
    m.add_argument("--medmnist-task", choices=("binary", "multi-class", "multi-label", "ordinal"),
                   help="task of the file (default: from the subset's name, else from the label layout)")
    m.add_argument("--label-names", help="comma-separated class names in index order (default: MedMNIST's)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench-files", type=int, default=64, help="files per syntax (default 64)")
    b.add_argument("--bench-workers", help="comma-separated worker counts to compare, e.g. "
                   "1,2,4,8,16 (default: 1 and all cores, or --workers)")
    return p
