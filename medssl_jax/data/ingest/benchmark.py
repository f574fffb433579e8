"""Ingestion throughput (files/s) on generated DICOM files, for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from medssl_jax.data.ingest.arguments import build_parser
from medssl_jax.data.ingest.run import run_ingest


# ----------------------------------------------------------------------------------------------
# Benchmark


CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_benchmark_files(out_dir: str | os.PathLike, *, n: int, size: int = 512,
                         syntax: str = "uncompressed", seed: int = 0) -> list[str]:
    """Writes n synthetic 16-bit (12 bits stored) CR DICOM files, smooth anatomy-like structure
    plus noise; syntax 'uncompressed' or 'jpeg2000' (lossless, encoded by pylibjpeg-openjpeg)."""
    from pydicom.uid import JPEG2000Lossless, generate_uid

    from medssl_jax.data.dicom import new_image_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = 1500 + 1200 * np.exp(-((xx - 0.3 - 0.05 * rng.random()) ** 2 + (yy - 0.5) ** 2) / 0.05)
        base += 1200 * np.exp(-((xx - 0.7) ** 2 + (yy - 0.5 - 0.05 * rng.random()) ** 2) / 0.05)
        img = np.clip(base + rng.normal(0, 40, (size, size)), 0, 4095).astype(np.uint16)
        ds = new_image_dataset(CR_IMAGE_STORAGE)
        ds.PatientID, ds.StudyInstanceUID = f"BENCH{i // 2:05d}", generate_uid()
        ds.Modality, ds.ViewPosition = "CR", "PA"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = img.tobytes()
        if syntax == "jpeg2000":
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        elif syntax != "uncompressed":
            raise ValueError(f"syntax must be 'uncompressed' or 'jpeg2000', got {syntax!r}")
        path = out / f"im{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def benchmark(*, n_files: int = 64, size: int = 512, store_size: int = 224,
              workers: tuple[int, ...] | None = None,
              syntaxes: tuple[str, ...] = ("uncompressed", "jpeg2000"),
              workdir: str | None = None) -> list[dict]:
    """End-to-end ingest rate (read + decode + resize + store write) on generated DICOM files,
    for each syntax and worker count. Returns rows {syntax, workers, files, seconds, files_per_s,
    startup_s, files_per_s_steady, files_per_s_steady_per_worker, cpu_ms_per_file_main,
    cpu_ms_per_file_workers}; 'steady' is the rate over the second half of the files (no process
    start-up, which a long ingestion amortises). The CPU costs do not depend on other load on the
    machine: N idle cores ingest about min(N_workers / worker cost, 1 / main cost) files/s."""
    workers = workers or tuple(sorted({1, os.cpu_count() or 1}))
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for syntax in syntaxes:
            src = Path(tmp) / syntax
            make_benchmark_files(src, n=n_files, size=size, syntax=syntax)
            for w in workers:
                out = Path(tmp) / f"store_{syntax}_{w}"
                args = build_parser().parse_args(
                    [f"--input={src}", f"--output={out}", f"--size={store_size}", f"--workers={w}",
                     "--salt=benchmark", "--quiet"])
                self0 = resource.getrusage(resource.RUSAGE_SELF)
                kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.monotonic()
                report = run_ingest(args)
                dt = time.monotonic() - t0
                self1 = resource.getrusage(resource.RUSAGE_SELF)
                kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once reaped
                cpu_main = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
                cpu_kids = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
                steady = report["files_per_s_steady"]
                rows.append(dict(syntax=syntax, workers=w, files=report["files_written"],
                                 seconds=round(dt, 3), files_per_s=round(n_files / dt, 1),
                                 startup_s=report["first_result_s"],
                                 files_per_s_steady=round(steady, 1),
                                 files_per_s_steady_per_worker=round(steady / w, 1),
                                 # CPU cost per file, which does not depend on other load on the
                                 # machine: with 1 worker everything runs in the main process.
                                 cpu_ms_per_file_main=round(1e3 * cpu_main / n_files, 2),
                                 cpu_ms_per_file_workers=round(1e3 * cpu_kids / n_files, 2)))
    return rows


