"""Ingestion CLI: a DICOM folder, or PNG/JPEG (or DICOM) files listed in a CSV, -> an image store.

    python -m medssl_jax.ingest --input=DIR --output=STORE [options]          # DICOM, by content
    python -m medssl_jax.ingest --csv=FILE --image-root=DIR --output=STORE [options]
    python -m medssl_jax.ingest --medmnist=FILE.npz --output=STORE            # MedMNIST v2, official splits
    python -m medssl_jax.ingest --verify=STORE                                # read every record, list bad ones
    python -m medssl_jax.ingest --benchmark [--bench-workers=1,2]             # files/s, generated DICOM

What it writes (STORE is the --output path):
* STORE/                    the store (medssl_jax.data.store), plus STORE/ingest_report.json:
                            files_seen, files_written, records_written, skipped [{path, reason}],
                            filtered [{path, reason}]. Every input file (or CSV row) is either
                            written or listed with a reason. Paths are relative to --input
                            (--image-root in CSV mode), or "source:ID" with --redact-paths.
* STORE.sources.csv         SENSITIVE: record id -> absolute source path (paths of a PACS export
                            often contain patient names). Keep it with the raw data, not the store.
* STORE.salt                SENSITIVE: the generated salt (only when --salt is not given). Anyone
                            holding it can test a guessed PatientID against the stored keys.
Patient and study keys in the store are salted BLAKE2b hashes; no DICOM identifying text
(PatientName, PatientID, BirthDate, AccessionNumber ...) is written to the store, the report or
the console.

Interrupted runs: records go to STORE.partial/, which is renamed to STORE only after the store,
its index, store.json and the report are complete; an interrupted run leaves only STORE.partial/
(never accepted by the reader; removed by the next run). Rerunning into an existing complete store
refuses unless --overwrite is given (the old store is replaced only once the new one is complete).
"""

from __future__ import annotations

import sys

from medssl_jax.data.ingest.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
