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

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import resource
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from medssl_jax.data import dicom, images, preprocess

REPORT_FILE = "ingest_report.json"
UNCERTAIN_POLICIES = ("zeros", "ones", "missing", "keep")
MISSING_POLICIES = ("zeros", "missing")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validate": "val", "validation": "val", "test": "test", "": ""}


class IngestError(ValueError):
    """Bad command-line input: one line naming the input and the problem."""


# ----------------------------------------------------------------------------------------------
# Keys and labels


def hash_key(salt: str, kind: str, value: str) -> str:
    """Salted key for a patient/study id: 32 hex chars of keyed BLAKE2b (not reversible without
    the salt; with it, only by guessing the id)."""
    key = hashlib.sha256(salt.encode("utf-8")).digest()
    return hashlib.blake2b(f"{kind}\x00{value}".encode("utf-8"), key=key,
                           digest_size=16).hexdigest()


def split_for(salt: str, patient_key: str, val_fraction: float, test_fraction: float) -> str:
    """Patient-wise split from the salted key: a patient's records always share a split."""
    if val_fraction <= 0 and test_fraction <= 0:
        return "train"
    u = int(hash_key(salt, "split", patient_key)[:13], 16) / 16 ** 13
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def parse_label(text: str, *, uncertain: str, missing: str) -> float:
    """CSV label cell -> float: 1/0 kept, -1 per the uncertain policy, blank per the missing one.
    Raises ValueError for anything else."""
    text = text.strip()
    if text == "":
        return 0.0 if missing == "zeros" else math.nan
    v = float(text)
    if v == 1.0 or v == 0.0:
        return v
    if v == -1.0:
        return {"zeros": 0.0, "ones": 1.0, "missing": math.nan, "keep": -1.0}[uncertain]
    raise ValueError(f"label value {text!r} is not 1, 0, -1 or blank")


def _is_label_value(text: str) -> bool:
    text = text.strip()
    if text == "":
        return True
    try:
        return float(text) in (1.0, 0.0, -1.0)
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# Worker side (runs in a process pool; must stay importable and jax-free)


@dataclasses.dataclass
class Task:
    source_id: int
    path: str            # absolute path of the file to read
    rel: str             # what the report may show
    patient: str = ""    # CSV mode: raw ids from the row (hashed in the worker)
    study: str = ""
    view: str = ""
    split: str = ""
    labels: tuple = ()
    error: str = ""      # CSV row problems found while parsing the CSV


@dataclasses.dataclass
class Result:
    source_id: int
    records: list        # list of dicts ready for StoreWriter.add (minus split/source_id)
    reason: str = ""     # skip reason when records == []
    filtered: bool = False


_OPTS: dict = {}


def _init_worker(opts: dict) -> None:
    _OPTS.clear()
    _OPTS.update(opts)


def _csv_image(task: Task, opts: dict) -> list[dict]:
    kind = "other"
    try:
        kind = dicom.sniff(task.path)
    except dicom.SkipFile:
        pass
    if kind == "dicom":
        frames = dicom.read_dicom(task.path, size=_read_size(opts), frames=opts["frames"],
                                  color=opts["color"], skip_burned_in=opts["skip_burned_in"])
        return [dict(image=f.image, modality=f.modality, bits_stored=f.bits_stored, frame=f.frame,
                     intensity_offset=f.intensity_offset, window_center=f.window_center,
                     window_width=f.window_width, view=task.view or f.view) for f in frames]
    if not os.path.exists(task.path):
        raise dicom.SkipFile("file not found")
    try:
        img, bits = images.read_image(task.path, color=opts["color"])
    except images.ImageError as e:
        raise dicom.SkipFile(e.reason) from None  # the report already names the file
    img = images.resize_longest(img, _read_size(opts))
    return [dict(image=np.ascontiguousarray(img), modality=opts["default_modality"],
                 bits_stored=bits, frame=-1, intensity_offset=0.0, window_center=math.nan,
                 window_width=math.nan, view=task.view)]


def _read_size(opts: dict) -> int | None:
    """The reader's aspect-keeping resize; a --preprocess does its own (square) resize of the native image."""
    return opts["size"] if opts.get("preprocess", "none") == "none" else None


def _preprocessed(records: list[dict], opts: dict) -> list[dict]:
    """Applies --preprocess to every record: 8-bit pixels, so no HU offset and no DICOM window survive."""
    if opts.get("preprocess", "none") == "none":
        return records
    for r in records:
        r.update(image=preprocess.tayebi(r["image"], opts["size"]), bits_stored=8, intensity_offset=0.0,
                 window_center=math.nan, window_width=math.nan)
    return records


def not_regular_reason(path: str) -> str | None:
    """Why `path` must not be opened (a FIFO, socket or device would block or never end), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # reported as "file not found" by the reader
    except OSError as e:
        return f"unreadable file ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "directory" if stat.S_ISDIR(mode) else "special file")
    return f"not a regular file ({kind}); skipped without reading"


def process_task(task: Task, opts: dict | None = None) -> Result:
    """Reads one file -> Result. Never raises for bad data (that is what Result.reason is for)."""
    opts = _OPTS if opts is None else opts
    if task.error:
        return Result(task.source_id, [], task.error)
    special = not_regular_reason(task.path)
    if special:
        return Result(task.source_id, [], special)
    salt = opts["salt"]
    try:
        if opts["mode"] == "dicom":
            frames = dicom.read_dicom(
                task.path, size=_read_size(opts), frames=opts["frames"], color=opts["color"],
                skip_burned_in=opts["skip_burned_in"], modalities=opts["modalities"],
                views=opts["views"])
            records = []
            for f in frames:
                patient_raw = f.patient_id or (f"study:{f.study_uid}" if f.study_uid
                                               else f"file:{task.path}")
                records.append(dict(
                    image=f.image, modality=f.modality, bits_stored=f.bits_stored, frame=f.frame,
                    intensity_offset=f.intensity_offset, window_center=f.window_center,
                    window_width=f.window_width, view=f.view,
                    patient=hash_key(salt, "patient", patient_raw),
                    study=hash_key(salt, "study", f.study_uid) if f.study_uid else ""))
        else:
            view = task.view.strip().upper()
            if opts["views"] is not None and view not in opts["views"]:
                return Result(task.source_id, [], f"filtered: view {view or '(none)'} not selected",
                              filtered=True)
            records = _csv_image(task, opts)
            if opts["modalities"] is not None and records and \
                    records[0]["modality"] not in opts["modalities"]:
                return Result(task.source_id, [],
                              f"filtered: modality {records[0]['modality']} not selected",
                              filtered=True)
            for r in records:
                r["patient"] = hash_key(salt, "patient", task.patient)
                r["study"] = hash_key(salt, "study", task.study) if task.study else ""
                r["view"] = r["view"].strip().upper()
    except dicom.SkipFile as e:
        reason = str(e)
        return Result(task.source_id, [], reason, filtered=reason.startswith("filtered:"))
    except Exception as e:  # noqa: BLE001 — a bug on one odd file must not end a long run
        return Result(task.source_id, [], f"internal error ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]})")
    return Result(task.source_id, _preprocessed(records, opts))


_ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/:,;()]+[\\/])*[^\s'\"\\/:,;()]*")


def scrub_paths(reason: str, task: Task, *, redact: bool) -> str:
    """A skip reason without any file path in it: library messages quote the absolute path, whose folder
    names are often patient names. The report names the file separately (relative, or source:ID)."""
    known = {task.path, *(str(p) for p in Path(task.path).parents)} if task.path else set()
    for text in sorted(known - {"", "/", "."}, key=len, reverse=True):  # the file and every folder above it
        reason = reason.replace(text, "<file>")
    reason = _ABSOLUTE_PATH.sub("<file>", reason)
    if redact and task.rel and len(task.rel) > 2:
        reason = reason.replace(task.rel, "<file>")
    return reason


# ----------------------------------------------------------------------------------------------
# Task lists


def dicom_tasks(input_dir: Path) -> list[Task]:
    """Every regular file under input_dir (any name: DICOM is recognised by content)."""
    tasks = []

    def unreadable(err: OSError) -> None:
        # os.walk would silently drop a folder it cannot list; report it instead.
        rel = os.path.relpath(err.filename, input_dir) if err.filename else "?"
        tasks.append(Task(len(tasks), str(err.filename), rel,
                          error=f"unreadable folder ({err.strerror or type(err).__name__})"))

    for root, dirs, files in os.walk(input_dir, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            tasks.append(Task(len(tasks), str(path.resolve()), str(path.relative_to(input_dir))))
    return tasks


def csv_tasks(csv_path: Path, image_root: Path, args) -> tuple[list[Task], list[str]]:
    """CSV rows -> tasks (one per row) and the label names."""
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise IngestError(f"--csv {csv_path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save "
                          "the CSV as UTF-8") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise IngestError(f"--csv {csv_path}: line {line} contains a NUL byte (a binary file, not a CSV)")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as e:
        raise IngestError(f"--csv {csv_path}: line {reader.line_num}: {e}") from None
    if not rows:
        raise IngestError(f"--csv {csv_path}: no data rows")
    for opt in ("path_column",) + (() if args.patient_regex else ("patient_column",)):
        col = getattr(args, opt)
        if col not in columns:
            raise IngestError(f"--csv {csv_path}: no column {col!r} (--{opt.replace('_', '-')}); "
                              f"columns are {columns}")
    for opt in ("study_column", "view_column", "split_column"):
        col = getattr(args, opt)
        if col and col not in columns and col != _DEFAULTS[opt]:
            raise IngestError(f"--csv {csv_path}: no column {col!r} (--{opt.replace('_', '-')})")
    used = {args.path_column, args.patient_column, args.study_column, args.view_column,
            args.split_column}
    if args.labels:
        label_names = [c.strip() for c in args.labels.split(",") if c.strip()]
        missing_cols = [c for c in label_names if c not in columns]
        if missing_cols:
            raise IngestError(f"--csv {csv_path}: label columns {missing_cols} not found; "
                              f"columns are {columns}")
    else:
        # Label columns: every other column whose cells are all 1, 0, -1 or blank (CheXpert style). A column
        # that is mostly such cells but has a few others is a typo, not a text column: stop and name it.
        label_names = []
        for c in columns:
            cells = [(i, (r.get(c) or "").strip()) for i, r in enumerate(rows)]
            filled = [(i, v) for i, v in cells if v]
            if c in used or not filled:
                continue
            bad = [(i, v) for i, v in filled if not _is_label_value(v)]
            if not bad:
                label_names.append(c)
            elif len(bad) <= 0.1 * len(filled):
                i, v = bad[0]
                raise IngestError(f"--csv {csv_path}: column {c!r} looks like a label column but row {i + 2} has "
                                  f"{v!r} (labels are 1, 0, -1 or blank; {len(bad)} such cell(s)); fix it, or "
                                  "name the label columns with --labels")
    patient_re = re.compile(args.patient_regex) if args.patient_regex else None
    study_re = re.compile(args.study_regex) if args.study_regex else None
    tasks = []
    for i, row in enumerate(rows):
        rel = (row.get(args.path_column) or "").strip()
        task = Task(i, str((image_root / rel).resolve()) if rel else "", rel or f"row:{i + 2}")
        if not rel:
            task.error = f"CSV row {i + 2}: empty {args.path_column!r}"
            tasks.append(task)
            continue
        if patient_re is not None:
            m = patient_re.search(rel)
            task.patient = m.group(1) if m and m.groups() else (m.group(0) if m else "")
        else:
            task.patient = (row.get(args.patient_column) or "").strip()
        if study_re is not None:
            m = study_re.search(rel)
            task.study = m.group(1) if m and m.groups() else (m.group(0) if m else "")
        elif args.study_column in columns:
            task.study = (row.get(args.study_column) or "").strip()
        if args.view_column in columns:
            task.view = (row.get(args.view_column) or "").strip()
        split_text = ((row.get(args.split_column) or "") if args.split_column in columns else "")
        split = _SPLIT_ALIASES.get(split_text.strip().lower())
        if not task.patient:
            task.error = f"CSV row {i + 2}: no patient id"
        elif split is None:
            task.error = f"CSV row {i + 2}: unknown split {split_text.strip()!r}"
        else:
            task.split = split
            try:
                task.labels = tuple(parse_label(row.get(c) or "", uncertain=args.uncertain,
                                                missing=args.missing) for c in label_names)
            except ValueError as e:
                task.error = f"CSV row {i + 2}: {e}"
        tasks.append(task)
    _refuse_duplicate_paths(csv_path, tasks)
    return tasks, label_names


def _refuse_duplicate_paths(csv_path: Path, tasks: list[Task]) -> None:
    """One image listed twice would become two records (under two patients, maybe in train and test)."""
    rows_of: dict[str, list[Task]] = {}
    for task in tasks:
        if task.path:
            rows_of.setdefault(task.path, []).append(task)
    repeated = [group for group in rows_of.values() if len(group) > 1]
    if not repeated:
        return
    described = []
    for group in repeated[:3]:
        patients = {t.patient for t in group}
        described.append(f"{group[0].rel!r} in rows {', '.join(str(t.source_id + 2) for t in group)}"
                         + (f" under {len(patients)} different patients" if len(patients) > 1 else ""))
    raise IngestError(f"--csv {csv_path}: {len(repeated)} image(s) listed more than once ("
                      + "; ".join(described) + (" ..." if len(repeated) > 3 else "")
                      + "); list every image once (duplicates could put the same pixels in train and test)")


# ----------------------------------------------------------------------------------------------
# Driver


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One self-overwriting line on stderr: files done, files/s, ETA, skipped. No paths."""

    def __init__(self, total: int, enabled: bool = True, every_s: float = 0.5):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, skipped: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        sys.stderr.write(f"\r[ingest] {done}/{self.total} files  {rate:.1f} files/s  "
                         f"ETA {_fmt_time(eta)}  skipped {skipped}   ")
        if force:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _store_name(output: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", output.name).lstrip("._-")
    return name or "store"


def _load_or_make_salt(args, output: Path) -> str:
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
    salt = _load_or_make_salt(args, output)
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
    progress = Progress(len(tasks), enabled=not args.quiet)
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
                                       initializer=_init_worker, initargs=(opts,))
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
        progress = Progress(store.num_records, enabled=not quiet)
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


# ----------------------------------------------------------------------------------------------
# Benchmark


def make_benchmark_files(out_dir: str | os.PathLike, *, n: int, size: int = 512,
                         syntax: str = "uncompressed", seed: int = 0) -> list[str]:
    """Writes n synthetic 16-bit (12 bits stored) CR DICOM files, smooth anatomy-like structure
    plus noise; syntax 'uncompressed' or 'jpeg2000' (lossless, encoded by pylibjpeg-openjpeg)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = 1500 + 1200 * np.exp(-((xx - 0.3 - 0.05 * rng.random()) ** 2 + (yy - 0.5) ** 2) / 0.05)
        base += 1200 * np.exp(-((xx - 0.7) ** 2 + (yy - 0.5 - 0.05 * rng.random()) ** 2) / 0.05)
        img = np.clip(base + rng.normal(0, 40, (size, size)), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
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


# ----------------------------------------------------------------------------------------------
# CLI

_DEFAULTS = dict(path_column="path", patient_column="patient", study_column="study",
                 view_column="view", split_column="split")


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
    for opt, default in _DEFAULTS.items():
        g.add_argument("--" + opt.replace("_", "-"), default=default,
                       help=f"column name (default {default!r})")
    g.add_argument("--patient-regex", help="take the patient id from the path instead of a column, "
                   r"e.g. '(patient\d+)' for CheXpert (first group, else the whole match)")
    g.add_argument("--study-regex", help=r"take the study id from the path, e.g. '(patient\d+/study\d+)'")
    g.add_argument("--labels", help="comma-separated label columns (default: every other column "
                   "whose cells are all 1, 0, -1 or blank)")
    g.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="zeros",
                   help="-1 (uncertain) labels: zeros (U-zeros, default: methods.md 3(d) "
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark:
        try:
            w = (tuple(int(v) for v in args.bench_workers.split(",")) if args.bench_workers
                 else (args.workers,) if args.workers else None)
        except ValueError:
            parser.error(f"--bench-workers={args.bench_workers}: use integers like 1,2,4")
        rows = benchmark(n_files=args.bench_files, workers=w)
        for r in rows:
            print(f"benchmark: {r['syntax']:>12}  workers={r['workers']}  end-to-end "
                  f"{r['files_per_s']:6.1f} files/s ({r['files']} files in {r['seconds']} s, "
                  f"first result after {r['startup_s']} s)  steady {r['files_per_s_steady']:6.1f} "
                  f"files/s = {r['files_per_s_steady_per_worker']:.1f} per worker; CPU ms/file "
                  f"main {r['cpu_ms_per_file_main']} workers {r['cpu_ms_per_file_workers']}")
        print(json.dumps(rows))
        return 0
    if args.verify:
        return verify_store(args.verify, quiet=args.quiet)
    if not (args.input or args.csv or args.medmnist or args.tfds):
        parser.error("give --input=DIR (DICOM), --csv=FILE (with --image-root), --medmnist=FILE.npz, "
                     "--tfds=NAME/CONFIG, or --benchmark")
    if not args.output:
        parser.error("--output=STORE is required")
    if args.medmnist and args.preprocess != "none":
        parser.error(f"--preprocess={args.preprocess} applies to --input/--csv images, not to --medmnist "
                     "(MedMNIST ships its own resized images)")
    if args.medmnist:
        from medssl_jax.data import medmnist

        names = tuple(n.strip() for n in args.label_names.split(",")) if args.label_names else None
        try:
            report = medmnist.write_store(args.medmnist, args.output, task=args.medmnist_task, label_names=names,
                                          name=args.name, overwrite=args.overwrite)
        except medmnist.MedMNISTError as e:
            print(f"ingest: error: {e}", file=sys.stderr)
            return 2
        print(f"ingest: {args.medmnist} ({report['subset'] or 'unknown subset'}, {report['task']}): "
              + ", ".join(f"{s} {n}" for s, n in report["records"].items())
              + f" images, labels {report['label_names']} -> {args.output}")
        return 0
    if args.tfds:
        return _tfds_main(args, parser)
    try:
        report = run_ingest(args)
    except IngestError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ingest: interrupted; no store was written (a rerun starts over)", file=sys.stderr)
        return 130
    print(summary_line(report, args.output))
    if report["num_skipped"] and not args.allow_skips:
        print(f"ingest: {report['num_skipped']} files skipped (see {args.output}/{REPORT_FILE}); "
              "pass --allow-skips to accept", file=sys.stderr)
        return 1
    return 0


def _tfds_main(args, parser) -> int:
    from medssl_jax.data.tfds import to_store

    if not args.tfds_data_dir:
        parser.error("--tfds needs --tfds-data-dir=DIR (where the builder was prepared)")
    if args.preprocess != "none" and args.size < 1:
        parser.error(f"--preprocess={args.preprocess}: needs the square target size (--size >= 1, got {args.size})")
    output = Path(args.output).absolute()
    try:
        report = to_store.write_store(args.tfds, data_dir=args.tfds_data_dir, output=output,
                                      salt=_load_or_make_salt(args, output), hash_key=hash_key,
                                      overwrite=args.overwrite, store_name=args.name, preprocess=args.preprocess,
                                      size=args.size)
    except (to_store.TfdsIngestError, IngestError) as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    print(f"ingest: {args.tfds} -> {args.output}: " + ", ".join(f"{s} {n}" for s, n in report["records"].items())
          + f" images, labels {report['label_names']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
