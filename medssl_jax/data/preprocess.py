"""Offline preprocessing a paper applied before training, offered at ingestion (`ingest --preprocess=NAME`).

'tayebi': Tayebi Arasteh et al. 2024 (their chestx `csv_data_preprocess.py::normalizer_resizer`),
applied to every image of the store:
  1. resize to size x size WITHOUT keeping the aspect ratio, with `scipy.ndimage.zoom(order=2)` (a spline
     of order 2) on the integer pixel array, as theirs;
  2. min-max normalisation to [0, 1], then `skimage.util.img_as_ubyte` (x 255, rounded) to 8 bits;
  3. MONOCHROME1 inverted (ours happens when the DICOM is read, before step 1: min-max and the spline are
     linear, so the order changes nothing but rounding of exact ties);
  4. global histogram equalisation, `cv2.equalizeHist`.
Their step 6 (saving as JPEG) is left out: the store keeps the 8-bit pixels losslessly.
tests/test_preprocess.py checks both against outputs of scipy, scikit-image and OpenCV themselves.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

PREPROCESSINGS = ("none", "tayebi")


def equalize_hist(image: np.ndarray) -> np.ndarray:
    """OpenCV's `equalizeHist` of an 8-bit image: cdf LUT scaled by 255 / (N - count of the darkest value).

    OpenCV computes the scale and the products in float32 and rounds half to even (cvRound); an image of
    one value comes back unchanged.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"equalize_hist needs a uint8 image, got {image.dtype}")
    hist = np.bincount(image.ravel(), minlength=256)
    darkest = int(np.flatnonzero(hist)[0]) if image.size else 0
    total = image.size
    if total == 0 or hist[darkest] == total:
        return image.copy()
    scale = np.float32(255.0) / np.float32(total - hist[darkest])
    cumulative = np.cumsum(hist) - hist[: darkest + 1].sum()  # counts above the darkest value
    lut = np.clip(np.rint(cumulative.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    lut[: darkest + 1] = 0
    return lut[image]


def to_ubyte(unit: np.ndarray) -> np.ndarray:
    """skimage's `img_as_ubyte` of a float image in [0, 1]: x 255, rounded half to even."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def tayebi(image: np.ndarray, size: int) -> np.ndarray:
    """Tayebi Arasteh et al.'s preprocessing of one grey image (see the module docstring) -> uint8 [size, size]."""
    if image.ndim != 2:
        raise ValueError(f"--preprocess=tayebi needs a grey image, got shape {image.shape} (use --color=gray)")
    if size < 1:
        raise ValueError(f"--preprocess=tayebi needs a target --size >= 1, got {size}")
    height, width = image.shape
    resized = scipy.ndimage.zoom(image, (size / height, size / width), order=2)
    values = resized.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    # Their code divides by zero on a constant image (NaN pixels); a constant image stays black here.
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return equalize_hist(to_ubyte(unit))
