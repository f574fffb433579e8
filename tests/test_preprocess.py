"""Tayebi Arasteh et al.'s offline preprocessing equals what their code computes with scipy, scikit-image
and OpenCV (outputs of those libraries stored in tests/data/tayebi_preprocess.npz by make_tayebi_fixture.py)."""

import os

import numpy as np
import pytest

from medssl_jax.data import preprocess

FIXTURE = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tayebi_preprocess.npz"))


@pytest.mark.parametrize("name", ["xray12", "jpeg8", "few_values"])
@pytest.mark.parametrize("size", [16, 24])
def test_tayebi_equals_their_pipeline(name, size):
    got = preprocess.tayebi(FIXTURE[f"in_{name}"], size)
    assert got.dtype == np.uint8 and got.shape == (size, size)  # square: the aspect ratio is not kept
    np.testing.assert_array_equal(got, FIXTURE[f"out_{name}_{size}"])


def test_equalize_hist_is_opencvs_and_img_as_ubyte_rounds_like_skimage():
    for index in range(3):
        np.testing.assert_array_equal(preprocess.equalize_hist(FIXTURE[f"eq_in_{index}"]), FIXTURE[f"eq_out_{index}"])
    np.testing.assert_array_equal(preprocess.to_ubyte(FIXTURE["ubyte_in"]), FIXTURE["ubyte_out"])
    flat = np.full((4, 4), 7, np.uint8)
    np.testing.assert_array_equal(preprocess.equalize_hist(flat), flat)  # OpenCV: one value stays as it is
    assert not preprocess.tayebi(np.full((5, 7), 300, np.uint16), 4).any()  # constant: black, not NaN
    with pytest.raises(ValueError, match="needs a grey image"):
        preprocess.tayebi(np.zeros((4, 4, 3), np.uint8), 4)
