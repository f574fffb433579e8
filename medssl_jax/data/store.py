"""The image store: one image per ArrayRecord record, a patient index, and a schema file.

Every data source (DICOM ingest, PNG+CSV ingest, the embedded phantoms) writes the same store with
`StoreWriter`; training and evaluation read it with `Store`.

Directory layout::

    STORE/store.json                         schema + completeness marker, written LAST
    STORE/index.npz                          per-record metadata and the patient -> record-ids index
    STORE/NAME-00000-of-000SS.array_record   shards, record ids are global and in shard order

store.json::

    {"format": "medssl_jax.store", "version": 1, "complete": true, "name": NAME,
     "num_records": N, "num_shards": S, "shard_files": [...], "shard_num_records": [...],
     "label_names": [...], "num_patients": P, "split_counts": {"train": n, ...},
     "compression": "zstd:3", "created_utc": "..."}

A reader accepts a store only when store.json exists, says complete=true and has the expected
format/version. The writer deletes an old store.json before touching anything else and writes the new
one after every shard and the index are on disk, so an interrupted write is never accepted.

Record schema (version 1): a msgpack map, one per image, with these keys

    image             bytes   raw pixel buffer, C order
    dtype             str     'uint8' | 'uint16' | 'int16'
    shape             [int]   (H, W) or (H, W, C)
    bits_stored       int     significant bits of the stored values (e.g. 12 for a 12-bit detector);
                              full scale of an unsigned image is 2**bits_stored - 1
    patient           str     patient key (ingest stores a salted hash, never the raw PatientID)
    study             str     study key ('' if unknown)
    view              str     acquisition view, e.g. 'PA', 'AP', 'LL' ('' if unknown)
    labels            [float] len(label_names) values, 1.0/0.0, NaN = missing
    modality          str     DICOM modality: 'CR', 'DX', 'CT', 'MR', 'US', 'OT', ...
    frame             int     frame number within a multi-frame source, -1 for single-frame
    intensity_offset  float   stored value = raw modality value + offset (e.g. CT HU + 1024);
                              0 for radiographs
    window_center     float   suggested display window (NaN if none)
    window_width      float   (NaN if none)
    split             str     'train' | 'val' | 'test' | '' (unassigned)
    source_id         int     index of the source file/row in the ingest manifest, -1 if none

index.npz holds, per record id: patients, studies, views, splits (str arrays), labels (float32 [N, L]),
source_ids (int64); and the patient groups in CSR form: group_patients (str [P]), group_offsets
(int64 [P+1]), group_record_ids (int64 [N]); record ids of group p are
group_record_ids[group_offsets[p]:group_offsets[p+1]], in increasing order.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np

from medssl_jax import jsonio

STORE_FORMAT = "medssl_jax.store"
STORE_VERSION = 1
STORE_JSON = "store.json"
INDEX_FILE = "index.npz"
SUPPORTED_DTYPES = ("uint8", "uint16", "int16")
SPLITS = ("train", "val", "test", "")
# Raw pixels of a radiograph compress ~1.3-2x with zstd:3 at a low decode cost; already-compressed
# payloads would use "uncompressed". The codec names are ArrayRecord writer option names.
_COMPRESSIONS = ("zstd", "brotli", "snappy", "uncompressed")
# TFDS aims for 64 MiB - 1 GiB per shard; a few hundred MiB keeps many shards for parallel reads
# without tiny files.
DEFAULT_SHARD_BYTES = 256 * 2**20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARTIAL_SUFFIX = ".array_record.partial"


class StoreError(ValueError):
    """A store cannot be written or read; the message is one line naming the store and the problem."""


def shard_file_name(name: str, index: int, num_shards: int) -> str:
    return f"{name}-{index:05d}-of-{num_shards:05d}.array_record"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_record(*, image: np.ndarray, bits_stored: int, patient: str, study: str, view: str,
                  labels: np.ndarray, modality: str, frame: int, intensity_offset: float,
                  window_center: float, window_width: float, split: str, source_id: int) -> bytes:
    """Serialises one already-validated record (see the module docstring for the schema)."""
    image = np.ascontiguousarray(image)
    return msgpack.packb({
        "image": image.tobytes(),
        "dtype": image.dtype.name,
        "shape": list(image.shape),
        "bits_stored": int(bits_stored),
        "patient": patient,
        "study": study,
        "view": view,
        "labels": [float(v) for v in labels],
        "modality": modality,
        "frame": int(frame),
        "intensity_offset": float(intensity_offset),
        "window_center": float(window_center),
        "window_width": float(window_width),
        "split": split,
        "source_id": int(source_id),
    }, use_bin_type=True)


def decode_record(raw: bytes) -> dict:
    """Inverse of `encode_record`: 'image' becomes an ndarray (H, W) or (H, W, C), 'labels' float32."""
    record = msgpack.unpackb(raw, raw=False)
    # frombuffer gives a read-only view of the msgpack bytes; host ops only read it, so no copy.
    record["image"] = np.frombuffer(record["image"], dtype=np.dtype(record["dtype"])).reshape(
        record["shape"])
    record["labels"] = np.asarray(record["labels"], dtype=np.float32)
    return record


def _is_store_artefact(file_name: str) -> bool:
    return (file_name in (STORE_JSON, INDEX_FILE) or file_name.endswith(".array_record")
            or file_name.endswith(_PARTIAL_SUFFIX))


class StoreWriter:
    """Writes a store; use as a context manager (an exception inside the block leaves no store).

    Records go to shards named `NAME-IIIII.array_record.partial` while writing (the shard count is
    not known until the end) and are renamed to `NAME-IIIII-of-SSSSS.array_record` by `close()`,
    which then writes index.npz and finally store.json.
    """

    def __init__(self, path: str | os.PathLike, *, name: str, label_names: Sequence[str],
                 records_per_shard: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, compression: str = "zstd:3"):
        from array_record.python.array_record_module import ArrayRecordWriter  # noqa: F401 (fail early)

        self.path = Path(path)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise StoreError(f"store name {name!r}: use letters, digits, '_', '-', '.' only")
        self.name = name
        self.label_names = [str(n) for n in label_names]
        if len(set(self.label_names)) != len(self.label_names):
            raise StoreError(f"store {self.path}: duplicate label names {self.label_names}")
        if records_per_shard is not None and records_per_shard < 1:
            raise StoreError(f"store {self.path}: records_per_shard must be >= 1, got {records_per_shard}")
        if shard_bytes < 1:
            raise StoreError(f"store {self.path}: shard_bytes must be >= 1, got {shard_bytes}")
        self.records_per_shard = records_per_shard
        self.shard_bytes = shard_bytes
        codec = compression.split(":")[0]
        if codec not in _COMPRESSIONS:
            raise StoreError(f"store {self.path}: unknown compression {compression!r}; "
                             f"use one of {_COMPRESSIONS} (e.g. 'zstd:3')")
        self.compression = compression
        self._writer_options = f"group_size:1,{compression}"
        self._prepare_directory(overwrite)

        self._shard_writer = None
        self._shard_partial_paths: list[Path] = []
        self._shard_num_records: list[int] = []
        self._shard_bytes_written = 0
        self._patients: list[str] = []
        self._studies: list[str] = []
        self._views: list[str] = []
        self._splits: list[str] = []
        self._labels: list[np.ndarray] = []
        self._source_ids: list[int] = []
        self._closed = False

    def _prepare_directory(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store {self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        existing = sorted(f for f in os.listdir(self.path) if _is_store_artefact(f))
        if existing and not overwrite:
            raise StoreError(f"store {self.path}: already holds store files ({existing[0]}, ...); "
                             "pass overwrite=True to replace it")
        # store.json goes first: from here on the old store is no longer valid to a reader.
        if STORE_JSON in existing:
            (self.path / STORE_JSON).unlink()
        for file_name in existing:
            if file_name != STORE_JSON:
                (self.path / file_name).unlink()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_records(self) -> int:
        return len(self._patients)

    def _validate_image(self, image) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise StoreError(f"store {self.path}: image must be a numpy array, got {type(image).__name__}")
        if image.dtype.name not in SUPPORTED_DTYPES:
            raise StoreError(f"store {self.path}: image dtype {image.dtype} not supported; "
                             f"use one of {SUPPORTED_DTYPES}")
        if image.ndim not in (2, 3) or min(image.shape) < 1 or (image.ndim == 3 and image.shape[2] > 4):
            raise StoreError(f"store {self.path}: image shape {image.shape} must be (H, W) or (H, W, C<=4)")
        return image

    def add(self, *, image: np.ndarray, patient: str, study: str = "", view: str = "", labels=None,
            modality: str = "OT", bits_stored: int | None = None, frame: int = -1,
            intensity_offset: float = 0.0, window_center: float = math.nan,
            window_width: float = math.nan, split: str = "train", source_id: int = -1) -> int:
        """Appends one image and returns its record id (0, 1, 2, ... in call order)."""
        if self._closed:
            raise StoreError(f"store {self.path}: add() after close()")
        image = self._validate_image(image)
        full_bits = image.dtype.itemsize * 8
        if bits_stored is None:
            bits_stored = full_bits
        if not 1 <= int(bits_stored) <= full_bits:
            raise StoreError(f"store {self.path}: bits_stored={bits_stored} out of range 1..{full_bits} "
                             f"for a {image.dtype} image")
        if not isinstance(patient, str) or not patient:
            raise StoreError(f"store {self.path}: patient key must be a non-empty string, got {patient!r}")
        if split not in SPLITS:
            raise StoreError(f"store {self.path}: split {split!r} not one of {SPLITS}")
        if labels is None:
            labels = np.full(len(self.label_names), np.nan, np.float32)
        labels = np.asarray(labels, dtype=np.float32).reshape(-1)
        if labels.shape[0] != len(self.label_names):
            raise StoreError(f"store {self.path}: got {labels.shape[0]} labels for "
                             f"{len(self.label_names)} label names {self.label_names}")

        payload = encode_record(
            image=image, bits_stored=int(bits_stored), patient=patient, study=str(study),
            view=str(view), labels=labels, modality=str(modality), frame=int(frame),
            intensity_offset=float(intensity_offset), window_center=float(window_center),
            window_width=float(window_width), split=split, source_id=int(source_id))
        self._write(payload)

        self._patients.append(patient)
        self._studies.append(str(study))
        self._views.append(str(view))
        self._splits.append(split)
        self._labels.append(labels)
        self._source_ids.append(int(source_id))
        return self.num_records - 1

    def _write(self, payload: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        shard_full = self._shard_writer is not None and (
            self._shard_bytes_written >= self.shard_bytes
            or (self.records_per_shard is not None
                and self._shard_num_records[-1] >= self.records_per_shard))
        if shard_full:
            self._shard_writer.close()
            self._shard_writer = None
        if self._shard_writer is None:
            partial = self.path / f"{self.name}-{len(self._shard_partial_paths):05d}{_PARTIAL_SUFFIX}"
            self._shard_writer = ArrayRecordWriter(str(partial), self._writer_options)
            self._shard_partial_paths.append(partial)
            self._shard_num_records.append(0)
            self._shard_bytes_written = 0
        self._shard_writer.write(payload)
        self._shard_num_records[-1] += 1
        self._shard_bytes_written += len(payload)

    def abort(self) -> None:
        """Stops writing and removes the partial shards; no store is left behind."""
        if self._shard_writer is not None:
            self._shard_writer.close()
            self._shard_writer = None
        for partial in self._shard_partial_paths:
            partial.unlink(missing_ok=True)
        self._closed = True

    def close(self) -> None:
        """Finishes the shards, writes index.npz and then store.json (complete=true)."""
        if self._closed:
            return
        if self.num_records == 0:
            self.abort()
            raise StoreError(f"store {self.path}: no records were added")
        self._shard_writer.close()
        self._shard_writer = None
        num_shards = len(self._shard_partial_paths)
        shard_files = []
        for index, partial in enumerate(self._shard_partial_paths):
            final_name = shard_file_name(self.name, index, num_shards)
            partial.rename(self.path / final_name)
            shard_files.append(final_name)

        patients = np.asarray(self._patients, dtype=str)
        splits = np.asarray(self._splits, dtype=str)
        group_patients, group_offsets, group_record_ids = _group_index(patients)
        labels = (np.stack(self._labels) if self.label_names
                  else np.zeros((self.num_records, 0), np.float32))
        with open(self.path / INDEX_FILE, "wb") as f:
            np.savez(f, patients=patients, studies=np.asarray(self._studies, dtype=str),
                     views=np.asarray(self._views, dtype=str), splits=splits, labels=labels,
                     source_ids=np.asarray(self._source_ids, np.int64),
                     group_patients=group_patients, group_offsets=group_offsets,
                     group_record_ids=group_record_ids)

        split_names, split_counts = np.unique(splits, return_counts=True)
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "complete": True,
            "name": self.name,
            "num_records": self.num_records,
            "num_shards": num_shards,
            "shard_files": shard_files,
            "shard_num_records": self._shard_num_records,
            "label_names": self.label_names,
            "num_patients": int(len(group_patients)),
            "split_counts": {str(s): int(c) for s, c in zip(split_names, split_counts)},
            "compression": self.compression,
            "created_utc": _utc_now(),
        }
        # Written to a temporary name and renamed: a reader never sees a half-written store.json.
        jsonio.write_json(self.path / STORE_JSON, meta, allow_nan=True)
        self._closed = True


def commit_store(partial: str | os.PathLike, output: str | os.PathLike) -> None:
    """Moves a complete store written at `partial` to `output`; an existing store there is replaced only
    now (renamed aside, then removed), so a crash at any point leaves a complete store at `output`, or none."""
    import shutil

    partial, output = Path(partial), Path(output)
    if output.exists():
        old = output.with_name(output.name + f".old-{os.getpid()}")
        output.rename(old)
        partial.rename(output)
        shutil.rmtree(old)
    else:
        partial.rename(output)


class StoreSource:
    """The store's shards as one random-access source, with damage reported as one line.

    Wraps grain's ArrayRecordDataSource (opened lazily, so the object pickles to Grain worker processes as
    a few strings and lists). A truncated or bit-flipped shard makes Riegeli fail its chunk checks and a
    damaged record fails msgpack decoding; both become StoreError naming the store, the shard file and the
    record (`python -m medssl_jax.ingest --verify=STORE` lists every such record).
    """

    def __init__(self, store_path: str, shard_paths: Sequence[str], shard_num_records: Sequence[int],
                 num_records: int):
        self.store_path = store_path
        self.shard_paths = list(shard_paths)
        self.offsets = np.concatenate([[0], np.cumsum(shard_num_records)]).astype(np.int64)
        self.num_records = int(num_records)
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _open(self):
        if self._source is None:
            import grain

            try:
                source = grain.sources.ArrayRecordDataSource(self.shard_paths)
            except Exception as error:  # noqa: BLE001 - a shard whose footer/index is damaged
                raise StoreError(f"store {self.store_path}: shard {self._unopenable_shard()} cannot be opened "
                                 f"({_first_line(error)}); the store is damaged, re-create it") from None
            if len(source) != self.num_records:
                raise StoreError(f"store {self.store_path}: shards hold {len(source)} records, "
                                 f"{STORE_JSON} says {self.num_records}")
            self._source = source
        return self._source

    def _unopenable_shard(self) -> str:
        import grain

        for path in self.shard_paths:
            try:
                grain.sources.ArrayRecordDataSource([path])
            except Exception:  # noqa: BLE001
                return os.path.basename(path)
        return "?"

    def __len__(self) -> int:
        return self.num_records

    def locate(self, record_id: int) -> tuple[str, int]:
        """(shard file name, position in the shard) of a record."""
        shard = int(np.searchsorted(self.offsets, record_id, side="right") - 1)
        return os.path.basename(self.shard_paths[shard]), int(record_id - self.offsets[shard])

    def _damaged(self, record_id: int, error: Exception) -> StoreError:
        shard, position = self.locate(record_id)
        return StoreError(f"store {self.store_path}: record {record_id} (shard {shard}, record {position} of it) "
                          f"is damaged ({_first_line(error)}); run python -m medssl_jax.ingest "
                          f"--verify={self.store_path} to list every damaged record")

    def __getitem__(self, record_id: int) -> bytes:
        source = self._open()
        try:
            return source[int(record_id)]
        except Exception as error:  # noqa: BLE001 - Riegeli/ArrayRecord raise several types
            raise self._damaged(int(record_id), error) from None

    def __getitems__(self, record_ids: Sequence[int]) -> list[bytes]:
        source = self._open()
        try:
            return source.__getitems__([int(i) for i in record_ids])
        except Exception:  # noqa: BLE001 - find which one
            return [self[i] for i in record_ids]

    def decoded(self, record_id: int, raw: bytes | None = None) -> dict:
        raw = self[record_id] if raw is None else raw
        try:
            return decode_record(raw)
        except Exception as error:  # noqa: BLE001 - msgpack, dtype or reshape errors of corrupt bytes
            raise self._damaged(int(record_id), error) from None


def _first_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _group_index(patients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient -> record ids in CSR form (patients sorted, record ids increasing within a patient)."""
    group_patients, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    group_record_ids = np.argsort(inverse, kind="stable").astype(np.int64)
    group_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return group_patients, group_offsets, group_record_ids


class Store:
    """Read access to a complete store: metadata arrays, decoded records, a Grain data source."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"store {self.path}: directory does not exist")
        meta_path = self.path / STORE_JSON
        if not meta_path.is_file():
            partial = any(_is_store_artefact(f) for f in os.listdir(self.path))
            reason = ("an interrupted or unfinished write (shards without store.json)" if partial
                      else "not a store")
            raise StoreError(f"store {self.path}: no {STORE_JSON} ({reason})")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"store {self.path}: {STORE_JSON} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise StoreError(f"store {self.path}: format {found!r} is not {STORE_FORMAT!r}")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"store {self.path}: version {meta.get('version')!r} is not supported "
                             f"(this code reads version {STORE_VERSION}); re-create the store")
        if meta.get("complete") is not True:
            raise StoreError(f"store {self.path}: marked incomplete (interrupted write)")
        if not meta.get("num_records"):
            raise StoreError(f"store {self.path}: holds zero records")
        self.meta = meta
        self.name: str = meta["name"]
        self.num_records: int = int(meta["num_records"])
        self.label_names: list[str] = list(meta["label_names"])
        self.shard_paths: list[str] = [str(self.path / f) for f in meta["shard_files"]]
        missing = [f for f in meta["shard_files"] if not (self.path / f).is_file()]
        if missing or len(self.shard_paths) != meta["num_shards"]:
            raise StoreError(f"store {self.path}: {len(missing)} of {meta['num_shards']} shard files "
                             f"missing (first: {missing[0] if missing else '?'})")
        if sum(meta["shard_num_records"]) != self.num_records:
            raise StoreError(f"store {self.path}: shard record counts do not add up to num_records")

        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise StoreError(f"store {self.path}: {INDEX_FILE} missing")
        try:
            with np.load(index_path, allow_pickle=False) as index:
                self.patients: np.ndarray = index["patients"]
                self.studies: np.ndarray = index["studies"]
                self.views: np.ndarray = index["views"]
                self.splits: np.ndarray = index["splits"]
                self.labels: np.ndarray = index["labels"].astype(np.float32)
                self.source_ids: np.ndarray = index["source_ids"]
                self._group_patients: np.ndarray = index["group_patients"]
                self._group_offsets: np.ndarray = index["group_offsets"]
                self._group_record_ids: np.ndarray = index["group_record_ids"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise StoreError(f"store {self.path}: {INDEX_FILE} is damaged ({_first_line(error)}); re-create the "
                             "store") from None
        if len(self.patients) != self.num_records or self.labels.shape != (
                self.num_records, len(self.label_names)):
            raise StoreError(f"store {self.path}: {INDEX_FILE} does not match {STORE_JSON} "
                             f"({len(self.patients)} index rows for {self.num_records} records)")
        self._source = None

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, name={self.name!r}, records={self.num_records}, "
                f"patients={len(self._group_patients)}, labels={self.label_names})")

    def __len__(self) -> int:
        return self.num_records

    def data_source(self) -> "StoreSource":
        """A picklable source over all shards: `source[i]` is the raw bytes of record i and
        `source.decoded(i)` the decoded record; a damaged shard or record raises a one-line StoreError
        naming the store, the shard and the record."""
        return StoreSource(str(self.path), self.shard_paths, list(self.meta["shard_num_records"]),
                           self.num_records)

    def __getitem__(self, record_id: int) -> dict:
        record_id = int(record_id)
        if not 0 <= record_id < self.num_records:
            raise IndexError(f"store {self.path}: record id {record_id} out of range 0..{self.num_records - 1}")
        if self._source is None:
            self._source = self.data_source()
        return self._source.decoded(record_id)

    def channels(self, ids=None) -> int:
        """Channels of the first record of `ids` (default: the whole store); the pipelines convert every
        other record to this count, so a grayscale store stays 1-channel and an RGB one 3."""
        first = self[int(ids[0]) if ids is not None and len(ids) else 0]["image"]
        return 1 if first.ndim == 2 else int(first.shape[-1])

    def verify(self, *, progress=None) -> list[dict]:
        """Reads and decodes every record; returns [{record, shard, reason}] for each one that fails."""
        source = self.data_source()
        bad = []
        for record_id in range(self.num_records):
            try:
                source.decoded(record_id)
            except StoreError as error:
                bad.append({"record": record_id, "shard": source.locate(record_id)[0], "reason": str(error)})
            if progress is not None:
                progress(record_id + 1, len(bad))
        return bad

    def ids(self, split: str | None) -> np.ndarray:
        """Record ids of a split (all records for None), increasing."""
        if split is None:
            return np.arange(self.num_records, dtype=np.int64)
        self._check_split(split)
        return np.flatnonzero(self.splits == split).astype(np.int64)

    def groups(self, split: str | None = None) -> dict[str, np.ndarray]:
        """Patient key -> its record ids (increasing), optionally only the records of one split."""
        if split is not None:
            self._check_split(split)
        result = {}
        for p, patient in enumerate(self._group_patients):
            ids = self._group_record_ids[self._group_offsets[p]:self._group_offsets[p + 1]]
            if split is not None:
                ids = ids[self.splits[ids] == split]
            if len(ids):
                result[str(patient)] = ids
        return result

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise StoreError(f"store {self.path}: unknown split {split!r}; use one of {SPLITS[:3]}")
