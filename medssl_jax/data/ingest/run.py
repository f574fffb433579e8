"""The ingestion driver: runs the tasks in a worker pool into STORE.partial/, writes the store, its
report and the sources list, renames it into place only when complete; and `verify_store`.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from medssl_jax import logging_lib
from medssl_jax.data.ingest.tasks import (REPORT_FILE, IngestError, csv_tasks, dicom_tasks, init_worker,
                                          process_task, scrub_paths, split_for)


# ----------------------------------------------------------------------------------------------
# Driver


def _store_name(output: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", output.name).lstrip("._-")
    return name or "store"


def load_or_make_salt(args, output: Path) -> str:
    if args.salt and args.salt_file:
        raise IngestError("--salt and --salt-file: give only one")
    if args.salt:
        return args.salt
    if args.salt_file:
        try:
            salt = Path(args.salt_file).read_text().strip()
        except OSError as e:
            raise IngestError(f"--salt-file {args.salt_file}: cannot read ({e.strerror})") from None
        if not salt:
            raise IngestError(f"--salt-file {args.salt_file}: empty")
        return salt
    salt_path = output.with_name(output.name + ".salt")
    if salt_path.exists():
        # Reuse: reruns and extra stores of the same archive keep the same patient keys.
        return salt_path.read_text().strip()
    salt = secrets.token_hex(32)
    fd = os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt


def _csv_list(text: str | None) -> frozenset[str] | None:
    if not text:
        return None
    return frozenset(t.strip().upper() for t in text.split(",") if t.strip())


def run_ingest(args) -> dict:
    """Runs one ingestion; returns the report dict (also written to STORE/ingest_report.json)."""
    output = Path(args.output).absolute()
    partial = output.with_name(output.name + ".partial")
    if (output / "store.json").exists() and not args.overwrite:
        raise IngestError(f"--output {output}: a store already exists there; pass --overwrite "
                          "to replace it (it is kept until the new one is complete)")
    if output.exists() and not output.is_dir():
        raise IngestError(f"--output {output}: exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not (output / "store.json").exists():
        raise IngestError(f"--output {output}: exists, is not empty and is not a store; "
                          "choose another path")
    if not output.parent.is_dir():
        raise IngestError(f"--output {output}: parent directory does not exist")
    if args.workers is not None and args.workers < 1:
        raise IngestError(f"--workers={args.workers}: must be >= 1")
    if not 0 <= args.val_fraction < 1 or not 0 <= args.test_fraction < 1 or \
            args.val_fraction + args.test_fraction >= 1:
        raise IngestError("--val-fraction/--test-fraction: each in [0, 1) and their sum below 1")
    if args.preprocess != "none" and (args.size < 1 or args.color != "gray"):
        raise IngestError(f"--preprocess={args.preprocess}: needs the square target size (--size >= 1, "
                          f"got {args.size}) and grey images (--color=gray, got {args.color})")

    if args.input:
        root = Path(args.input).absolute()
        if not root.is_dir():
            raise IngestError(f"--input {root}: not a directory")
        if output == root or root in output.parents:
            raise IngestError(f"--output {output}: inside --input {root}; a rerun would read the "
                              "store as input. Choose a path outside it")
        mode = "dicom"
        tasks, label_names = dicom_tasks(root), []
    else:
        csv_path = Path(args.csv)
        root = Path(args.image_root).absolute() if args.image_root else csv_path.absolute().parent
        if not csv_path.is_file():
            raise IngestError(f"--csv {csv_path}: file not found")
        if not root.is_dir():
            raise IngestError(f"--image-root {root}: not a directory")
        mode = "csv"
        tasks, label_names = csv_tasks(csv_path, root, args)
    if not tasks:
        raise IngestError(f"--input {root}: no files found")
    salt = load_or_make_salt(args, output)
    workers = args.workers or os.cpu_count() or 1
    opts = dict(mode=mode, salt=salt, size=args.size or None, preprocess=args.preprocess, frames=args.frames,
                color=args.color, skip_burned_in=not args.keep_burned_in, modalities=_csv_list(args.modality),
                views=_csv_list(args.view), default_modality=args.default_modality.upper())
    return _run(tasks, opts, output=output, partial=partial, label_names=label_names,
                workers=workers, args=args, mode=mode)


def _run(tasks, opts, *, output: Path, partial: Path, label_names, workers: int, args,
         mode: str) -> dict:
    from medssl_jax.data.store import StoreWriter, commit_store

    if partial.exists():  # leftovers of an interrupted run: never a valid store, safe to drop
        shutil.rmtree(partial)
    sources_path = output.with_name(output.name + ".sources.csv")
    sources_tmp = sources_path.with_name(sources_path.name + ".partial")
    start = time.monotonic()
    progress = logging_lib.FileProgress(len(tasks), enabled=not args.quiet)
    by_id = {t.source_id: t for t in tasks}
    skipped, filtered, reasons = [], [], Counter()
    files_written = records_written = 0
    show = (lambda t: f"source:{t.source_id}") if args.redact_paths else (lambda t: t.rel)

    writer = StoreWriter(partial, name=args.name or _store_name(output), label_names=label_names,
                         overwrite=True)
    pool = None
    closed = False
    try:
        if workers > 1:
            # spawn, not fork: the caller may have imported jax, and forking its threads deadlocks.
            # ProcessPoolExecutor (not multiprocessing.Pool): a worker that dies, or cannot start,
            # raises BrokenProcessPool instead of being respawned forever.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=init_worker, initargs=(opts,))
            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            results = pool.map(process_task, tasks, chunksize=chunk)
        else:
            results = (process_task(t, opts) for t in tasks)
        # Source paths are sensitive (folder names of a PACS export): readable by the owner only.
        with os.fdopen(os.open(sources_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="") as sf:
            sw = csv.writer(sf)
            sw.writerow(["record_id", "source_id", "frame", "path"])
            first_result_s = half_s = None
            half = max(1, len(tasks) // 2)
            for done, res in enumerate(results, 1):
                if first_result_s is None:
                    first_result_s = time.monotonic() - start
                if done == half:
                    half_s = time.monotonic() - start
                task = by_id[res.source_id]
                if res.records:
                    files_written += 1
                    split = task.split if mode == "csv" and task.split else ""
                    for rec in res.records:
                        if not split:
                            split = split_for(opts["salt"], rec["patient"], args.val_fraction,
                                              args.test_fraction)
                        labels = (np.asarray(task.labels, np.float32) if label_names else None)
                        rid = writer.add(split=split, source_id=task.source_id, labels=labels, **rec)
                        sw.writerow([rid, task.source_id, rec["frame"], task.path])
                        records_written += 1
                else:
                    entry = {"path": show(task), "reason": scrub_paths(res.reason, task,
                                                                       redact=args.redact_paths)}
                    (filtered if res.filtered else skipped).append(entry)
                    reasons["filtered" if res.filtered else res.reason.split(" (")[0]] += 1
                progress.update(done, len(skipped))
        progress.update(len(tasks), len(skipped), force=True)
        if pool is not None:
            pool.shutdown()
            pool = None
        elapsed = time.monotonic() - start
        report = {
            "format": "medssl_jax.ingest_report", "version": 1, "mode": mode,
            "files_seen": len(tasks), "files_written": files_written,
            "records_written": records_written, "num_skipped": len(skipped),
            "num_filtered": len(filtered), "skipped": skipped, "filtered": filtered,
            "reason_counts": dict(reasons.most_common()), "label_names": label_names,
            "options": {k: (sorted(v) if isinstance(v, frozenset) else v)
                        for k, v in opts.items() if k != "salt"} | {
                "workers": workers, "val_fraction": args.val_fraction,
                "test_fraction": args.test_fraction, "uncertain": args.uncertain,
                "missing": args.missing,
                "salt": "given" if (args.salt or args.salt_file) else "STORE.salt"},
            "elapsed_s": round(elapsed, 3), "files_per_s": round(len(tasks) / max(elapsed, 1e-9), 2),
            # Rate over the second half of the files, i.e. without worker start-up (spawn +
            # imports, ~1 s per process): what a long run approaches.
            "first_result_s": round(first_result_s, 3),
            "files_per_s_steady": round((len(tasks) - half) / max(elapsed - half_s, 1e-9), 2),
        }
        assert report["files_seen"] == files_written + len(skipped) + len(filtered)
        if records_written == 0:
            writer.abort()
            (partial / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
            raise IngestError(f"--output {output}: no image could be ingested from "
                              f"{len(tasks)} files; see {partial / REPORT_FILE}")
        writer.close()
        closed = True
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    except BaseException as e:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if not closed:
            writer.abort()
        sources_tmp.unlink(missing_ok=True)
        if isinstance(e, BrokenProcessPool):
            raise IngestError(f"--workers={workers}: a worker process died or could not start "
                              f"({e}); retry with --workers=1 to see the cause") from None
        raise
    commit_store(partial, output)  # the new store replaces the old one only now that it is complete
    sources_tmp.replace(sources_path)
    return report


def verify_store(path: str, *, quiet: bool = False) -> int:
    """`--verify=STORE`: 0 when every record reads and decodes, 1 (listing them) when some do not, 2 when
    the store cannot be opened at all."""
    from medssl_jax.data.store import Store, StoreError

    try:
        store = Store(path)
        progress = logging_lib.FileProgress(store.num_records, enabled=not quiet)
        bad = store.verify(progress=lambda done, failed: progress.update(done, failed))
    except StoreError as error:
        print(f"ingest: error: {error}", file=sys.stderr)
        return 2
    progress.update(store.num_records, len(bad), force=True)
    for entry in bad:
        print(f"verify: {entry['reason']}", file=sys.stderr)
    print(f"verify: store {path}: {store.num_records} records in {len(store.shard_paths)} shards, "
          f"{len(bad)} damaged" + ("" if bad else " (all records read and decoded)"))
    return 1 if bad else 0


def summary_line(report: dict, output: str) -> str:
    top = ", ".join(f"{n} {r}" for r, n in list(report["reason_counts"].items())[:4])
    return (f"ingest: {report['files_seen']} files seen, {report['files_written']} written "
            f"({report['records_written']} records), {report['num_skipped']} skipped, "
            f"{report['num_filtered']} filtered, {report['files_per_s']} files/s -> {output}"
            + (f" [{top}]" if top else ""))


