"""What ingestion does to each input: task lists (a DICOM folder walked by content, a CSV of
images), salted patient keys and splits, label parsing, and the worker that turns one task into records
(runs in a process pool: stays importable without jax).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from medssl_jax.data import dicom, images, preprocess


REPORT_FILE = "ingest_report.json"
UNCERTAIN_POLICIES = ("zeros", "ones", "missing", "keep")
MISSING_POLICIES = ("zeros", "missing")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validate": "val", "validation": "val", "test": "test", "": ""}


CSV_COLUMN_DEFAULTS = dict(path_column="path", patient_column="patient", study_column="study",
                 view_column="view", split_column="split")


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


def init_worker(opts: dict) -> None:
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
        if col and col not in columns and col != CSV_COLUMN_DEFAULTS[opt]:
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


