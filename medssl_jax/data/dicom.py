"""DICOM files -> pixel arrays ready for the store, plus the metadata ingestion needs.

One entry point, :func:`read_dicom`, turns a path into a list of :class:`DicomFrame` records or
raises :class:`SkipFile` with a one-line reason. Nothing else ever escapes it, so one bad file
cannot stop an ingestion run.

Pixel conventions (what the store receives):
* Grayscale values are the modality-LUT output (RescaleSlope/Intercept, a Modality LUT Sequence,
  or the per-frame / shared functional groups of enhanced multi-frame objects), rounded, plus
  ``intensity_offset`` so that they are non-negative: ``stored = value + intensity_offset``.
  CT uses a fixed offset of 1024, so ``stored - 1024`` is Hounsfield units; values below
  -1024 HU (outside-FOV padding such as -2000 or -3024) are clipped to -1024.
  Other signed data use the offset that maps their theoretical minimum to 0.
* ``bits_stored`` is the number of significant bits of the stored values (at least 12 for CT;
  BitsStored for unsigned X-ray, MR ...), never more than 16: data wider than 16 bits is shifted
  right by s bits to fit (offset and window are divided by 2**s too, so ``stored - offset`` is
  then ``value / 2**s``). uint8 is used when bits_stored <= 8, uint16 otherwise.
* MONOCHROME1 is inverted (``stored = 2**bits_stored - 1 - stored``) so that high means bright
  (bone white) for every record.
* The VOI window (first WindowCenter/WindowWidth, or the per-frame FrameVOILUTSequence) is
  recorded in the same units as ``stored - intensity_offset`` (i.e. after the MONOCHROME1
  inversion). A VOI LUT Sequence is summarised as the window spanning the LUT's input range.
* Colour (RGB, YBR_* which pydicom converts to RGB, PALETTE COLOR through its LUT) becomes
  grayscale luma (``color='gray'``) or stays (H, W, 3) (``color='rgb'``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, iter_pixels
from pydicom import uid as dcm_uid

from medssl_jax.data import images

CT_OFFSET = 1024
# Objects that may carry pixel data but are not images to learn from (dose grids, label maps,
# presentation states, waveforms, reports, plans ...).
NON_IMAGE_MODALITIES = frozenset({
    "SR", "RTPLAN", "RTSTRUCT", "RTRECORD", "RTDOSE", "RTIMAGE_PLAN", "SEG", "ECG", "EEG",
    "EMG", "EOG", "HD", "AU", "KO", "PR", "REG", "FID", "DOC", "PLAN", "RWV", "RESP", "IVOCT_PS"})
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
FRAME_MODES = ("all", "first", "middle")
COLOR_MODES = ("gray", "rgb")


class SkipFile(Exception):
    """A file that is not ingested; str(e) is a one-line reason without identifying text."""


@dataclasses.dataclass
class DicomFrame:
    """One image ready for StoreWriter.add (plus raw grouping ids that must be hashed first)."""
    image: np.ndarray
    modality: str
    bits_stored: int
    frame: int
    intensity_offset: float
    window_center: float
    window_width: float
    view: str
    # Raw identifiers: only ever hashed (data/ingest/tasks.py), never written anywhere.
    patient_id: str
    study_uid: str


def _quiet_pydicom() -> None:
    # pydicom warns about odd element values and may quote them; values can be PHI, so those
    # messages must never reach a log. Reading stays lenient (IGNORE), decoding decides.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


_quiet_pydicom()


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else text


def sniff(path: str | os.PathLike) -> str:
    """Content sniffing: 'dicom' (preamble + DICM), 'raw' (looks like a DICOM data set without a
    preamble, i.e. starts with a group 0002/0008 tag), or 'other'."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise SkipFile(f"unreadable file ({type(e).__name__}: {e.strerror or _one_line(e)})") from None
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    # Little endian group 0x0002/0x0008 (first element of meta / identifying group), or big endian.
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
        return "raw"
    return "other"


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without meta (or meta without (0002,0010)) cannot be decoded by pydicom 3; derive the
    syntax from how the data set was actually parsed."""
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    if implicit:
        ts = dcm_uid.ImplicitVRLittleEndian
    else:
        ts = dcm_uid.ExplicitVRLittleEndian if little else dcm_uid.ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ts


def open_dicom(path: str | os.PathLike) -> Dataset:
    """Reads a file as DICOM, refusing non-DICOM content. force=True is used only for files that
    look like a data set without preamble, and the result must then have image attributes."""
    kind = sniff(path)
    if kind == "other":
        raise SkipFile("not DICOM (no DICM preamble and no DICOM tag at the start)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=(kind == "raw"))
    except InvalidDicomError as e:
        raise SkipFile(f"not DICOM ({_one_line(e, 80)})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError,
            AttributeError, IndexError, OverflowError) as e:
        raise SkipFile(f"unreadable DICOM header ({type(e).__name__}: {_one_line(e)})") from None
    if kind == "raw":
        # A forced read "succeeds" on nearly anything: demand the bones of a real data set.
        if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows")):
            raise SkipFile("not DICOM (no preamble and a forced read found no DICOM attributes)")
    return ds


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    return sop == dcm_uid.MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


def _check_decodable(ds: Dataset) -> None:
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_compressed:
        return
    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        raise SkipFile(f"no decoder in pydicom for transfer syntax {ts.name}") from None
    if not dec.is_available:
        raise SkipFile(f"transfer syntax {ts.name} needs a decoder plugin that is not installed")
    if ts == dcm_uid.JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8 \
        and "pylibjpeg" not in dec.available_plugins:
        raise SkipFile("12-bit JPEG Extended needs pylibjpeg-libjpeg (GPL-3.0), which is not "
                       "installed")


def _item(seq_owner: Dataset, name: str) -> Dataset | None:
    seq = seq_owner.get(name)
    return seq[0] if seq else None


def _functional(ds: Dataset, frame: int, seq_name: str) -> Dataset | None:
    """Per-frame item of an enhanced multi-frame functional group, else the shared one."""
    for groups_name, idx in (("PerFrameFunctionalGroupsSequence", frame),
                             ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups and len(groups) > idx:
            item = _item(groups[idx], seq_name)
            if item is not None:
                return item
    return None


def _first(value) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if not len(value):
            return math.nan
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _rescale(ds: Dataset, frame: int) -> tuple[float, float, bool]:
    """(slope, intercept, is_lut_sequence) for a frame."""
    pvt = _functional(ds, max(frame, 0), "PixelValueTransformationSequence")
    if pvt is not None and "RescaleSlope" in pvt:
        return _first(pvt.RescaleSlope), _first(pvt.get("RescaleIntercept", 0.0)), False
    if "ModalityLUTSequence" in ds:
        return 1.0, 0.0, True
    slope, inter = _first(ds.get("RescaleSlope", 1.0)), _first(ds.get("RescaleIntercept", 0.0))
    slope = 1.0 if math.isnan(slope) or slope == 0 else slope
    inter = 0.0 if math.isnan(inter) else inter
    return slope, inter, False


def _window(ds: Dataset, frame: int) -> tuple[float, float]:
    voi = _functional(ds, max(frame, 0), "FrameVOILUTSequence")
    src = voi if voi is not None and "WindowCenter" in voi else ds
    if "WindowCenter" in src and "WindowWidth" in src:
        return _first(src.WindowCenter), _first(src.WindowWidth)
    lut = _item(ds, "VOILUTSequence")
    if lut is not None and "LUTDescriptor" in lut:
        # Summarise the LUT by the input range it spans: [first mapped, first mapped + entries).
        n, first = int(lut.LUTDescriptor[0]) or 65536, float(lut.LUTDescriptor[1])
        return first + n / 2.0, float(n)
    return math.nan, math.nan


def _modality_values(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    slope, inter, is_lut = _rescale(ds, frame)
    if is_lut:
        return apply_modality_lut(arr, ds).astype(np.float64)
    return arr.astype(np.float64) * slope + inter


def _theoretical_range(ds: Dataset, frame: int) -> tuple[float, float]:
    """Range of the modality-LUT output over all storable values (not the data's own min/max,
    which would give every file a different offset)."""
    bs = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo_raw, hi_raw = -(2 ** (bs - 1)), 2 ** (bs - 1) - 1
    else:
        lo_raw, hi_raw = 0, 2 ** bs - 1
    slope, inter, is_lut = _rescale(ds, frame)
    if is_lut:
        lut = ds.ModalityLUTSequence[0]
        out_bits = int(lut.LUTDescriptor[2])
        return 0.0, float(2 ** out_bits - 1)
    a, b = lo_raw * slope + inter, hi_raw * slope + inter
    return min(a, b), max(a, b)


def _gray_frame(arr: np.ndarray, ds: Dataset, frame: int, modality: str,
                pi: str) -> tuple[np.ndarray, int, float, float, float]:
    """-> (stored uint8/uint16, bits_stored, offset, window_center, window_width)."""
    values = _modality_values(arr, ds, frame)
    wc, ww = _window(ds, frame)
    bs_tag = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    lo_theo, hi_theo = _theoretical_range(ds, frame)
    if modality == "CT":
        offset = float(CT_OFFSET)
    elif lo_theo >= 0:
        offset = 0.0
    else:
        # Signed data (or a negative intercept) outside CT: most such files (MR, NM) hold only
        # non-negative values, which are kept as they are; true negatives get the smallest
        # power-of-two offset that lifts them to >= 0.
        lo = float(values.min()) if values.size else 0.0
        offset = 0.0 if lo >= 0 else float(2 ** math.ceil(math.log2(-math.floor(lo))))
    stored = np.clip(np.rint(values + offset), 0, None)
    top = int(stored.max()) if stored.size else 0
    if modality == "CT":
        bits = max(12, top.bit_length())
    elif lo_theo >= 0:
        bits = max(1, min(bs_tag, 16) if hi_theo < 2 ** min(bs_tag, 16) else
                   int(math.ceil(math.log2(hi_theo + 1))))
        bits = max(bits, top.bit_length())
    else:
        bits = max(8, top.bit_length())
    shift = 0
    if bits > 16:
        # Wider than the store's 16 bits: drop the low bits (keeps the full dynamic range).
        shift = bits - 16
        stored = np.floor(stored / 2 ** shift)
        bits = 16
        offset /= 2 ** shift
        wc, ww = wc / 2 ** shift, ww / 2 ** shift
    stored = np.clip(stored, 0, 2 ** bits - 1)
    if pi == "MONOCHROME1":
        top_value = 2 ** bits - 1
        stored = top_value - stored
        if not math.isnan(wc):
            wc = (top_value - (wc + offset)) - offset
    dtype = np.uint8 if bits <= 8 else np.uint16
    return stored.astype(dtype), bits, offset, wc, ww


def _color_frame(arr: np.ndarray, ds: Dataset, pi: str, color: str) -> tuple[np.ndarray, int]:
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 2:  # a palette LUT of one channel or a lone sample: already grayscale
        arr = arr[..., None].repeat(3, axis=-1)
    if arr.dtype.kind == "f":
        raise SkipFile("floating-point colour pixel data is not supported")
    arr = arr.astype(np.uint64 if arr.dtype.itemsize > 2 else arr.dtype)
    top = int(arr.max()) if arr.size else 0
    bits = 8 if arr.dtype.itemsize == 1 else max(
        8, min(int(ds.get("BitsStored", 16) or 16), 32), top.bit_length())
    if bits > 16:
        arr = arr >> (bits - 16)
        bits = 16
    arr = arr.astype(np.uint8 if bits <= 8 else np.uint16)
    if color == "gray":
        arr = images.to_gray(arr)
    return arr, bits


def _frame_indices(n_frames: int, frames: str) -> list[int]:
    if n_frames <= 1:
        return [0]
    if frames == "first":
        return [0]
    if frames == "middle":
        return [n_frames // 2]
    return list(range(n_frames))


def read_dicom(path: str | os.PathLike, *, size: int | None = None, frames: str = "all",
               color: str = "gray", skip_burned_in: bool = True,
               modalities: frozenset[str] | None = None,
               views: frozenset[str] | None = None) -> list[DicomFrame]:
    """Reads one DICOM file -> list of DicomFrame (one per selected frame), or raises SkipFile.

    size: longest side after an anti-aliased, aspect-keeping resize (None: native size).
    frames: 'all' (one record per frame), 'first' or 'middle' for multi-frame objects.
    color: 'gray' (luma) or 'rgb' (colour kept as (H, W, 3)).
    modalities / views: if given, files outside them raise SkipFile('filtered: ...').
    """
    if frames not in FRAME_MODES:
        raise ValueError(f"frames must be one of {FRAME_MODES}, got {frames!r}")
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    ds = open_dicom(path)
    if _is_dicomdir(ds):
        raise SkipFile("DICOMDIR (a directory index, no image)")
    modality = str(ds.get("Modality", "") or "OT").strip().upper() or "OT"
    if modality in NON_IMAGE_MODALITIES:
        raise SkipFile(f"non-image object (Modality {modality})")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise SkipFile(f"no pixel data (Modality {modality})")
    if "PixelData" not in ds:
        raise SkipFile("floating-point pixel data (parametric map) is not supported")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if modalities is not None and modality not in modalities:
        raise SkipFile(f"filtered: modality {modality} not selected")
    if views is not None and view not in views:
        raise SkipFile(f"filtered: view {view or '(none)'} not selected")
    if skip_burned_in and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise SkipFile("burned-in annotation (BurnedInAnnotation=YES) may show identifying text")
    try:
        _ensure_transfer_syntax(ds)
        for kw in ("Rows", "Columns", "BitsAllocated"):
            if kw not in ds:
                raise SkipFile(f"missing required image attribute {kw}")
        _check_decodable(ds)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except SkipFile:
        raise
    except (ValueError, TypeError, AttributeError) as e:
        raise SkipFile(f"invalid image attributes ({type(e).__name__}: {_one_line(e)})") from None
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    is_color = spp > 1 or pi == "PALETTE COLOR"
    patient_id = str(ds.get("PatientID", "") or "")
    study_uid = str(ds.get("StudyInstanceUID", "") or ds.get("AccessionNumber", "") or "")
    indices = _frame_indices(n_frames, frames)
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, arr in zip(indices, iter_pixels(ds, indices=indices)):
                if arr.dtype.kind == "f":
                    raise SkipFile("floating-point pixel data is not supported")
                if is_color:
                    img, bits = _color_frame(arr, ds, pi, color)
                    offset, wc, ww = 0.0, math.nan, math.nan
                else:
                    if arr.ndim != 2:
                        raise SkipFile(f"unexpected grayscale frame shape {arr.shape}")
                    img, bits, offset, wc, ww = _gray_frame(arr, ds, k, modality, pi)
                img = images.resize_longest(img, size, max_value=2 ** bits - 1)
                out.append(DicomFrame(
                    image=np.ascontiguousarray(img), modality=modality, bits_stored=bits,
                    frame=k if n_frames > 1 else -1, intensity_offset=offset, window_center=wc,
                    window_width=ww, view=view, patient_id=patient_id, study_uid=study_uid))
    except SkipFile:
        raise
    except MemoryError:
        raise SkipFile("out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 — decoder plugins raise anything; one file never stops a run
        msg = _one_line(e)
        if "less than expected" in msg or "truncated" in msg.lower():
            raise SkipFile(f"truncated pixel data ({msg})") from None
        raise SkipFile(f"pixel data could not be decoded ({type(e).__name__}: {msg})") from None
    return out


def new_image_dataset(sop_class_uid: str):
    """An empty image Dataset of SOP class `sop_class_uid` with its file meta (explicit VR little endian,
    new instance UID), for writing DICOM files (the ingestion benchmark, tests) to fill in."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds
