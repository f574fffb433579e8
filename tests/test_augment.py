"""Device-side augmentation: conversions, each operation against a reference, presets, keys, sharding."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medssl_jax import augment


def _only(**fields):
    cfg = augment.preset("none")
    cfg.update(**fields)
    return cfg


def _run(x, cfg, seed=0):
    return jax.jit(lambda x, key: augment.augment_views(x, rng=key, cfg=cfg))(x, jax.random.key(seed))


def _uint16_views(shape=(4, 2, 16, 16, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


def test_to_unit_and_normalize():
    np.testing.assert_allclose(augment.to_unit(np.array([0, 32768, 65535], np.uint16)), [0.0, 32768 / 65535, 1.0])
    np.testing.assert_allclose(augment.to_unit(np.array([0, 255], np.uint8)), [0.0, 1.0])
    assert augment.to_unit(np.array([0.5], np.float64)).dtype == jnp.float32
    x = np.full((2, 2, 3), 0.5, np.float32)
    np.testing.assert_allclose(augment.normalize(x, mean=[0.5, 0.25, 0.0], std=[1.0, 0.5, 0.25]),
                               np.broadcast_to([0.0, 0.5, 2.0], (2, 2, 3)))


@pytest.mark.parametrize("name", augment.PRESETS)
def test_presets_keep_shape_and_range(name):
    views = _uint16_views()
    out = _run(views, augment.preset(name))
    assert out.shape == views.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    if name == "none":
        np.testing.assert_allclose(out, views / 65535.0, rtol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        augment.preset("imagenet")


def test_preset_values_follow_the_papers():
    cxr, simclr = augment.preset("azizi_cxr"), augment.preset("simclr")
    assert (cxr.brightness, cxr.contrast, cxr.color_p, cxr.rotation_max_deg, cxr.blur_p) == (0.4, 0.4, 0.8, 45.0, 0.0)
    assert (simclr.brightness, simclr.hue, simclr.grayscale_p, simclr.blur_p) == (0.8, 0.2, 0.2, 0.5)
    assert (simclr.blur_sigma_min, simclr.blur_sigma_max) == (0.1, 2.0)
    assert augment.blur_kernel_size(224) == 23  # SimCLR: 22 -> radius 11 -> 23


def test_same_key_same_result_different_keys_and_images_differ():
    cfg = augment.preset("azizi_cxr")
    views = np.repeat(_uint16_views((1, 1, 16, 16, 1)), 2, axis=1)  # the same image twice in a row
    first, again, other = _run(views, cfg, 0), _run(views, cfg, 0), _run(views, cfg, 1)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first[0, 0], first[0, 1])  # each image draws its own parameters


def test_rotation():
    image = jax.random.uniform(jax.random.key(0), (15, 15, 2))
    np.testing.assert_array_equal(augment.rotate(image, 0.0), image)
    np.testing.assert_allclose(augment.rotate(image, 90.0), np.rot90(image, 1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(augment.rotate(image, -90.0), np.rot90(image, -1, axes=(0, 1)), atol=1e-5)
    rotated = augment.rotate(jnp.ones((16, 16, 1)), 45.0)
    assert float(rotated[0, 0, 0]) == 0.0 and float(rotated[8, 8, 0]) == pytest.approx(1.0)  # fill 0, bilinear
    # As an op of augment_views with rotation_max_deg 0 nothing moves.
    views = _uint16_views()
    np.testing.assert_allclose(_run(views, _only(rotation_p=1.0, rotation_max_deg=0.0)), views / 65535, atol=1e-7)


@pytest.mark.parametrize("size", [(32, 32), (31, 24)])
def test_nearest_rotation_is_pils_which_torchvisions_random_rotation_calls(size):
    from PIL import Image

    height, width = size
    image = np.random.default_rng(3).integers(1, 256, (height, width)).astype(np.uint8)  # no 0: fill shows
    for degrees in (7.0, -7.0, 3.3, -0.6, 30.0):
        expected = np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=0))
        got = np.asarray(augment.rotate(jnp.asarray(image, jnp.float32)[..., None], degrees,
                                        interpolation="nearest"))[..., 0].astype(np.uint8)
        # PIL's fast path accumulates 16.16 fixed-point steps along a row, so a source point within ~0.002
        # of a cell border can land in the neighbouring cell (measured: every mismatch at 224 px and 7
        # degrees is within 0.0017 of a border; 0.17 % of the pixels); everything else is identical.
        assert np.mean(got == expected) > 0.995, degrees
        if abs(degrees) > 1:
            assert got[0, 0] == expected[0, 0] == 0  # the corners are filled with 0
    with pytest.raises(ValueError, match="'bicubic' is not one of"):
        augment.rotate(jnp.zeros((4, 4, 1)), 5.0, interpolation="bicubic")


def test_gaussian_blur_matches_scipy_with_zero_padding():
    image = np.random.default_rng(1).random((40, 40, 2)).astype(np.float32)
    kernel_size = augment.blur_kernel_size(40)  # 5
    for sigma in (0.5, 1.7):
        blurred = augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma), kernel_size=kernel_size)
        expected = scipy.ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="constant", cval=0.0,
                                                 radius=(kernel_size // 2, kernel_size // 2, 0))
        np.testing.assert_allclose(blurred, expected, atol=1e-6)
        inner = (slice(4, -4), slice(4, -4))
        assert abs(float(blurred[inner].mean()) - float(image[inner].mean())) < 5e-3
        assert float(blurred.std()) < float(image.std())


def test_brightness_and_contrast_jitter():
    image = 0.4 + 0.2 * np.random.default_rng(2).random((16, 16, 16, 1)).astype(np.float32)  # no clipping
    bright = np.asarray(_run(image, _only(color_p=1.0, brightness=0.4)))
    ratio = bright / image
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1], ratio.shape), rtol=1e-5)  # one multiplicative factor per image
    assert np.all((ratio[:, 0, 0] >= 0.6 - 1e-6) & (ratio[:, 0, 0] <= 1.4 + 1e-6)) and ratio.std() > 0.05
    contrast = np.asarray(_run(image, _only(color_p=1.0, contrast=0.4)))
    np.testing.assert_allclose(contrast.mean(axis=(1, 2)), image.mean(axis=(1, 2)), atol=1e-6)  # mean kept
    # Deviations from the mean scale by one factor per image.
    image_dev = image - image.mean(axis=(1, 2), keepdims=True)
    contrast_dev = contrast - contrast.mean(axis=(1, 2), keepdims=True)
    factor = (contrast_dev * image_dev).sum(axis=(1, 2), keepdims=True) / (image_dev**2).sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(contrast_dev, factor * image_dev, atol=1e-6)
    assert np.all((factor >= 0.6 - 1e-6) & (factor <= 1.4 + 1e-6)) and factor.std() > 0.05


def test_colour_ops_on_rgb_and_skipped_on_one_channel():
    rgb = np.random.default_rng(3).random((64, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.rgb_to_hsv(rgb), [colorsys.rgb_to_hsv(*c) for c in rgb], atol=1e-6)
    np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(rgb)), rgb, atol=1e-6)
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(augment._adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-6)
    np.testing.assert_allclose(augment._adjust_saturation(red, 0.0), [[[1.0, 1.0, 1.0]]], atol=1e-6)
    gray = augment.to_grayscale(jnp.asarray(rgb.reshape(8, 8, 3)))
    np.testing.assert_allclose(gray[..., 1], rgb.reshape(8, 8, 3) @ [0.2989, 0.5870, 0.1140], rtol=1e-5)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    one_channel = np.random.default_rng(4).random((4, 16, 16, 1)).astype(np.float32)
    colour_only = _only(color_p=1.0, saturation=0.8, hue=0.2, grayscale_p=1.0)
    np.testing.assert_array_equal(_run(one_channel, colour_only), one_channel)
    three = np.random.default_rng(4).random((4, 16, 16, 3)).astype(np.float32)
    assert not np.allclose(_run(three, colour_only), three)


def test_apply_probability_per_image():
    images = np.full((400, 4, 4, 1), 0.5, np.float32)
    out = np.asarray(_run(images, _only(color_p=0.5, brightness=0.5)))
    changed = np.abs(out - images).max(axis=(1, 2, 3)) > 1e-6
    assert 0.4 < changed.mean() < 0.6


def test_gamma_and_solarize():
    image = np.linspace(0.05, 0.95, 64, dtype=np.float32).reshape(1, 8, 8, 1)
    out = np.asarray(_run(image, _only(gamma_p=1.0, gamma_min=0.5, gamma_max=2.0)))
    gamma = np.log(out) / np.log(image)
    np.testing.assert_allclose(gamma, gamma.flat[0], rtol=1e-4)
    assert 0.5 <= gamma.flat[0] <= 2.0
    out = np.asarray(_run(image, _only(solarize_p=1.0, solarize_threshold=0.5)))
    np.testing.assert_allclose(out, np.where(image < 0.5, image, 1 - image), atol=1e-7)
    with pytest.raises(ValueError, match="gamma range"):
        _run(image, _only(gamma_p=1.0, gamma_min=0.0, gamma_max=2.0))


def test_sharded_batch_gives_the_unsharded_result():
    assert jax.device_count() == 8
    views = _uint16_views((16, 2, 16, 16, 1), seed=5)
    cfg = augment.preset("azizi_cxr")
    cfg.update(blur_p=0.5, gamma_p=0.5, gamma_min=0.7, gamma_max=1.4)
    expected = _run(views, cfg, seed=3)
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(views, NamedSharding(mesh, P("data")))
    out = _run(sharded, cfg, seed=3)
    assert out.sharding.spec[0] == "data"
    # Same random draws per image; only float rounding may differ (XLA fuses the sharded program differently).
    np.testing.assert_allclose(out, expected, atol=3e-6)
