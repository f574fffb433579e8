"""DICOM decoding: modality LUT / HU, MONOCHROME1, functional groups, frames, colour, failures."""
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, pixel_array

from medssl_jax.data import dicom, images


def _file(name):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available offline (install pydicom-data)")
    return path


def test_ct_hu_preserved_exactly():
    path = _file("CT_small.dcm")
    (fr,) = dicom.read_dicom(path, size=None)
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert fr.modality == "CT" and fr.intensity_offset == dicom.CT_OFFSET
    assert fr.image.dtype == np.uint16 and fr.image.shape == hu.shape
    np.testing.assert_array_equal(fr.image.astype(np.float64) - fr.intensity_offset,
                                  np.maximum(hu, -1024))
    assert fr.bits_stored == 12 and fr.frame == -1


def test_ct_below_minus_1024_is_clipped_and_window_recorded():
    path = _file("693_UNCR.dcm")
    (fr,) = dicom.read_dicom(path, size=None)
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(fr.image.astype(np.int64) - 1024, np.clip(hu, -1024, None))
    assert (fr.window_center, fr.window_width) == (float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1
                                                         else ds.WindowCenter),
                                                   float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1
                                                         else ds.WindowWidth))


def test_enhanced_ct_uses_functional_groups():
    path = _file("eCT_Supplemental.dcm")
    frames = dicom.read_dicom(path, size=None, frames="all")
    ds = pydicom.dcmread(path)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert [f.frame for f in frames] == [0, 1]
    for f in frames:
        raw = pixel_array(ds, index=f.frame).astype(np.float64)
        hu = raw * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        np.testing.assert_array_equal(f.image.astype(np.float64) - 1024, np.clip(hu, -1024, None))
        assert (f.window_center, f.window_width) == (49.0, 102.0)


def test_monochrome1_inverted_full_resolution_chest():
    path = _file("RG1_UNCR.dcm")
    (fr,) = dicom.read_dicom(path, size=None)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and fr.modality == "CR"
    assert fr.bits_stored == ds.BitsStored == 15
    np.testing.assert_array_equal(fr.image, (2 ** 15 - 1) - ds.pixel_array)
    # the window follows the inversion
    assert fr.window_center == pytest.approx(2 ** 15 - 1 - float(ds.WindowCenter))


def test_monochrome1_with_rescale():
    base = os.path.dirname(_file("CT_small.dcm"))
    path = os.path.join(base, "dicomdirtests", "77654033", "CR1", "6154")
    ds = pydicom.dcmread(path)
    (fr,) = dicom.read_dicom(path, size=None)
    value = np.rint(apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_array_equal(fr.image, 2 ** fr.bits_stored - 1 - value)


def test_lossless_codecs_decode_identically():
    ref = dicom.read_dicom(_file("MR_small.dcm"), size=None)[0].image
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm"):
        np.testing.assert_array_equal(dicom.read_dicom(_file(name), size=None)[0].image, ref)


def test_resize_keeps_aspect_and_range():
    (fr,) = dicom.read_dicom(_file("RG1_J2KI.dcm"), size=64)
    assert fr.image.shape == (64, 60) and fr.image.dtype == np.uint16
    assert fr.image.max() < 2 ** 15


def test_frames_option():
    path = _file("emri_small.dcm")
    assert [f.frame for f in dicom.read_dicom(path, frames="all")] == list(range(10))
    assert [f.frame for f in dicom.read_dicom(path, frames="first")] == [0]
    assert [f.frame for f in dicom.read_dicom(path, frames="middle")] == [5]


def test_colour_gray_or_rgb():
    path = _file("US1_UNCR.dcm")
    (gray,) = dicom.read_dicom(path, size=None, color="gray")
    (rgb,) = dicom.read_dicom(path, size=None, color="rgb")
    assert rgb.image.shape == (480, 640, 3) and rgb.image.dtype == np.uint8
    assert gray.image.shape == (480, 640)
    np.testing.assert_array_equal(gray.image, images.to_gray(rgb.image))
    (pal,) = dicom.read_dicom(_file("examples_palette.dcm"), color="rgb", size=None)
    assert pal.image.ndim == 3 and pal.image.shape[2] == 3


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "truncated pixel data"),
    ("test-SR.dcm", "non-image object (Modality SR)"),
    ("rtplan.dcm", "non-image object (Modality RTPLAN)"),
    ("JPGExtended.dcm", "12-bit JPEG Extended needs pylibjpeg-libjpeg"),
    ("no_meta.dcm", "not DICOM"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "pixel data could not be decoded"),
])
def test_bad_files_give_reasons(name, reason):
    with pytest.raises(dicom.SkipFile, match=reason.replace("(", r"\(").replace(")", r"\)")):
        dicom.read_dicom(_file(name))


def test_cut_garbage_and_preambleless(tmp_path):
    src = _file("CT_small.dcm")
    data = open(src, "rb").read()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only").write_bytes(data[:600])
    (tmp_path / "garbage").write_bytes(b"\x08\x00" + os.urandom(500))
    (tmp_path / "empty").write_bytes(b"")
    for name in ("cut", "header_only", "garbage", "empty"):
        with pytest.raises(dicom.SkipFile) as e:
            dicom.read_dicom(tmp_path / name)
        assert "\n" not in str(e.value)
    # The same file without its 128-byte preamble and 'DICM': read with force, then validated.
    assert data[128:132] == b"DICM"
    (tmp_path / "nopreamble").write_bytes(data[132:])
    assert dicom.sniff(tmp_path / "nopreamble") == "raw"
    (fr,) = dicom.read_dicom(tmp_path / "nopreamble", size=None)
    np.testing.assert_array_equal(fr.image, dicom.read_dicom(src, size=None)[0].image)


def test_filters():
    path = _file("CT_small.dcm")
    with pytest.raises(dicom.SkipFile, match="filtered: modality CT"):
        dicom.read_dicom(path, modalities=frozenset({"CR", "DX"}))
    with pytest.raises(dicom.SkipFile, match="filtered: view"):
        dicom.read_dicom(path, views=frozenset({"PA"}))
