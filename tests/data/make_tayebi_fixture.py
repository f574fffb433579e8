"""Writes tayebi_preprocess.npz: Tayebi Arasteh et al.'s preprocessing computed by the libraries their code
calls (scipy zoom, skimage img_as_ubyte, cv2.equalizeHist), for tests/test_preprocess.py.

Run once, in an environment with the reference libraries (not a dependency of this project):
    pip install numpy scipy scikit-image opencv-python-headless && python tests/data/make_tayebi_fixture.py
Written with scipy 1.17.1, scikit-image 0.26.0, opencv-python-headless 5.0.0.
"""

import os

import cv2
import numpy as np
from scipy.ndimage import zoom
from skimage.util import img_as_ubyte


def their_pipeline(img, size):
    """csv_data_preprocess.py::normalizer_resizer, step for step (the JPEG write left out)."""
    img = zoom(img, np.divide((size, size), img.shape), order=2)
    img = (img - np.min(img)) / (np.max(img) - np.min(img))
    return cv2.equalizeHist(img_as_ubyte(img))


def inputs():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = 2000 + 1500 * np.sin(yy / 6.0) * np.cos(xx / 9.0) + rng.normal(0, 200, (37, 53))
    return {
        "xray12": np.clip(smooth, 0, 4095).astype(np.uint16),  # a 12-bit DICOM-like frame, not square
        "jpeg8": rng.integers(30, 220, (41, 29)).astype(np.uint8),  # an 8-bit grey JPEG/PNG
        "few_values": rng.choice(np.array([10, 10, 10, 90, 200], np.uint8), (20, 20)),  # ties in the histogram
    }


def main():
    out = {}
    for name, img in inputs().items():
        out[f"in_{name}"] = img
        for size in (16, 24):
            out[f"out_{name}_{size}"] = their_pipeline(img, size)
    rng = np.random.default_rng(1)
    for index, image in enumerate([rng.integers(0, 256, (30, 30)), rng.integers(100, 110, (17, 23)),
                                   np.r_[np.zeros(500), rng.integers(0, 256, 100)].reshape(20, 30)]):
        image = image.astype(np.uint8)
        out[f"eq_in_{index}"], out[f"eq_out_{index}"] = image, cv2.equalizeHist(image)
    ties = np.arange(511) / 510.0  # every k/510: half of them exact .5 ties after x 255
    out["ubyte_in"], out["ubyte_out"] = ties, img_as_ubyte(ties)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tayebi_preprocess.npz")
    np.savez_compressed(path, **out)
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
