"""Device-side photometric (and rotation) augmentation: pure jnp, batched, run inside the jitted step.

The host pipeline does the shape-changing work (decode, random-resized crop, flip) and hands over fixed-size
uint16 views; everything here is per-pixel work that is cheap on an accelerator and would be expensive on
the host CPU. Each image draws its own randomness from its own key (`jax.random.split` of the step key,
then `vmap`), so results do not depend on how the batch is sharded over devices.

The colour operations follow google-research/simclr `data_util.py` (v2 code): `color_jitter_rand` applies
brightness, contrast, saturation and hue, each with its own random factor, in a random order, clipping to
[0, 1] after each; SimCLR's strength s sets brightness = contrast = saturation = 0.8 s and hue = 0.2 s; the
whole jitter is applied with probability `color_p` (0.8), then grayscale with `grayscale_p` (0.2).
Saturation, hue and grayscale act on RGB and are skipped for 1-channel images (on a gray image they are
no-ops anyway). The Gaussian blur is SimCLR's: sigma ~ U(0.1, 2.0), kernel size 10% of the height made odd,
separable, zero ('SAME') padding, applied per image with probability `blur_p`.

Order inside `augment_views`: rotation, colour jitter, grayscale, gamma, blur, solarize, final clip.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

# ITU-R 601 luma, as tf.image.rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

PRESETS = ("azizi_cxr", "simclr", "none")


def _simclr_color(strength: float) -> dict:
    return {"brightness": 0.8 * strength, "contrast": 0.8 * strength, "saturation": 0.8 * strength,
            "hue": 0.2 * strength}


def preset(name: str) -> ml_collections.ConfigDict:
    """Augmentation config by name.

    'azizi_cxr': Azizi et al.'s chest X-ray recipe (device part): SimCLR colour jitter at strength 0.5
      with p 0.8 (brightness/contrast on 1-channel images), rotation up to +-45 degrees, no blur.
    'simclr': SimCLR's natural-image recipe: colour jitter strength 1.0 with p 0.8, grayscale p 0.2,
      blur p 0.5.
    'none': no augmentation (conversion to [0, 1] only), for evaluation.
    """
    if name not in PRESETS:
        raise ValueError(f"augmentation preset {name!r} is not one of {list(PRESETS)}")
    cfg = ml_collections.ConfigDict({
        "rotation_p": 0.0, "rotation_max_deg": 0.0, "rotation_interpolation": "bilinear",  # or "nearest"
        "color_p": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
        "brightness_mode": "multiplicative",  # SimCLR v2; v1 was additive (tf.image.random_brightness)
        "grayscale_p": 0.0,
        "gamma_p": 0.0, "gamma_min": 1.0, "gamma_max": 1.0,
        "blur_p": 0.0, "blur_sigma_min": 0.1, "blur_sigma_max": 2.0, "blur_kernel_frac": 0.1,
        "solarize_p": 0.0, "solarize_threshold": 0.5,
    })
    if name == "azizi_cxr":
        cfg.update(rotation_p=1.0, rotation_max_deg=45.0, color_p=0.8, grayscale_p=0.2, **_simclr_color(0.5))
    elif name == "simclr":
        cfg.update(color_p=0.8, grayscale_p=0.2, blur_p=0.5, **_simclr_color(1.0))
    return cfg


def to_unit(x: jax.Array) -> jax.Array:
    """Integer pixels (uint16 from the pipeline, or uint8) to float32 in [0, 1]; floats pass through as f32."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / float(jnp.iinfo(x.dtype).max)
    return x.astype(jnp.float32)


def normalize(x: jax.Array, *, mean, std) -> jax.Array:
    """(x - mean) / std, broadcast over the trailing channel axis (scalars or per-channel sequences)."""
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---- single-image operations on [H, W, C] float32 in [0, 1] ----

ROTATION_INTERPOLATIONS = ("bilinear", "nearest")


def rotate(image: jax.Array, degrees: jax.Array, *, interpolation: str = "bilinear") -> jax.Array:
    """Rotates counter-clockwise (as displayed, rows pointing down) about the centre; fill 0.

    'nearest' is PIL's `Image.rotate(angle, NEAREST, fillcolor=0)`, which torchvision's RandomRotation
    calls on a PIL image (Tayebi Arasteh et al.'s augmentation): the output pixel takes the input pixel
    whose cell contains its source point (floor(src + 0.5) in index coordinates).
    """
    if interpolation not in ROTATION_INTERPOLATIONS:
        raise ValueError(f"rotation interpolation {interpolation!r} is not one of {list(ROTATION_INTERPOLATIONS)}")
    height, width, _ = image.shape
    theta = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    center_row, center_col = (height - 1) / 2, (width - 1) / 2
    # Inverse map: the output pixel at offset (dx, dy_up) reads the input at R(-theta) (dx, dy_up).
    dx, dy_up = cols - center_col, center_row - rows
    src_col = center_col + dx * cos + dy_up * sin
    src_row = center_row - (-dx * sin + dy_up * cos)
    if interpolation == "nearest":
        row, col = jnp.floor(src_row + 0.5).astype(jnp.int32), jnp.floor(src_col + 0.5).astype(jnp.int32)
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        picked = image[jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)]
        return jnp.where(inside[..., None], picked, 0.0).astype(image.dtype)
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_row, src_col], order=1, mode="constant", cval=0.0)
    return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """tf.image.rgb_to_hsv: all components in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    delta = value - jnp.min(rgb, axis=-1)
    safe_delta = jnp.where(delta > 0, delta, 1.0)
    saturation = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0), 0.0)
    hue = jnp.where(value == r, jnp.mod((g - b) / safe_delta, 6.0),
                    jnp.where(value == g, (b - r) / safe_delta + 2.0, (r - g) / safe_delta + 4.0))
    hue = jnp.where(delta > 0, hue / 6.0, 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]

    def channel(n):
        k = jnp.mod(n + hue * 6.0, 6.0)
        return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _adjust_brightness(image, factor, mode):
    return image * factor if mode == "multiplicative" else image + factor


def _adjust_contrast(image, factor):
    # tf.image.adjust_contrast: per-channel mean over the image.
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return (image - mean) * factor + mean


def _adjust_saturation(image, factor):
    hsv = rgb_to_hsv(image)
    return hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0)))


def _adjust_hue(image, delta):
    hsv = rgb_to_hsv(image)
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0)))


def to_grayscale(image: jax.Array) -> jax.Array:
    gray = image @ jnp.asarray(_GRAY_WEIGHTS, image.dtype)
    return jnp.repeat(gray[..., None], image.shape[-1], axis=-1)


def blur_kernel_size(height: int, kernel_frac: float = 0.1) -> int:
    """SimCLR: kernel_size = height * 10%, radius = kernel_size // 2, size = 2 * radius + 1 (23 at 224)."""
    return 2 * (int(height * kernel_frac) // 2) + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array, *, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur with zero padding (SimCLR's depthwise conv, padding='SAME').

    Each pass is a product with a banded [n, n] matrix holding the normalised kernel, which gives the
    zero padding for free and runs as a batched matmul under vmap.
    """
    radius = kernel_size // 2
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    norm = jnp.sum(jnp.exp(-taps**2 / (2 * sigma**2)))

    def band(n):
        offset = jnp.arange(n, dtype=jnp.float32)[:, None] - jnp.arange(n, dtype=jnp.float32)[None, :]
        weights = jnp.exp(-offset**2 / (2 * sigma**2)) / norm
        return jnp.where(jnp.abs(offset) <= radius, weights, 0.0)

    height, width, _ = image.shape
    highest = jax.lax.Precision.HIGHEST
    image = jnp.einsum("hk,kwc->hwc", band(height), image, precision=highest)
    return jnp.einsum("wk,hkc->hwc", band(width), image, precision=highest)


def _random_apply(key, p, op, image):
    if p <= 0:
        return image
    return jnp.where(jax.random.uniform(key) < p, op(image), image)


def _color_jitter(image, key, cfg):
    """SimCLR color_jitter_rand: the enabled ops in a random order, each followed by a clip to [0, 1]."""
    channels = image.shape[-1]
    factor_key, order_key = jax.random.split(key)
    factor_keys = jax.random.split(factor_key, 4)

    def uniform_factor(k, amount):  # U[max(0, 1 - amount), 1 + amount], as SimCLR v2
        return jax.random.uniform(k, minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)

    ops = []
    if cfg.brightness > 0:
        if cfg.brightness_mode == "multiplicative":
            factor = uniform_factor(factor_keys[0], cfg.brightness)
        elif cfg.brightness_mode == "additive":
            factor = jax.random.uniform(factor_keys[0], minval=-cfg.brightness, maxval=cfg.brightness)
        else:
            raise ValueError(f"augment brightness_mode={cfg.brightness_mode!r} is not 'multiplicative' or 'additive'")
        ops.append(lambda x, f=factor: _adjust_brightness(x, f, cfg.brightness_mode))
    if cfg.contrast > 0:
        ops.append(lambda x, f=uniform_factor(factor_keys[1], cfg.contrast): _adjust_contrast(x, f))
    if channels == 3 and cfg.saturation > 0:
        ops.append(lambda x, f=uniform_factor(factor_keys[2], cfg.saturation): _adjust_saturation(x, f))
    if channels == 3 and cfg.hue > 0:
        delta = jax.random.uniform(factor_keys[3], minval=-cfg.hue, maxval=cfg.hue)
        ops.append(lambda x, d=delta: _adjust_hue(x, d))
    if not ops:
        return image
    order = jax.random.permutation(order_key, len(ops))
    for position in range(len(ops)):
        # Under vmap the branch index is per image, so switch evaluates every op and selects.
        image = jnp.clip(jax.lax.switch(order[position], ops, image), 0.0, 1.0)
    return image


def augment_image(image: jax.Array, key: jax.Array, cfg) -> jax.Array:
    """One [H, W, C] float image in [0, 1] -> its augmented version (see the module docstring)."""
    keys = dict(zip(("rotation", "rotation_angle", "color", "color_ops", "grayscale", "gamma", "gamma_value",
                     "blur", "blur_sigma", "solarize"), jax.random.split(key, 10)))
    height, _, channels = image.shape
    if cfg.rotation_max_deg > 0:
        angle = jax.random.uniform(keys["rotation_angle"], minval=-cfg.rotation_max_deg, maxval=cfg.rotation_max_deg)
        image = _random_apply(keys["rotation"], cfg.rotation_p,
                              lambda x: rotate(x, angle, interpolation=cfg.rotation_interpolation), image)
    image = _random_apply(keys["color"], cfg.color_p, lambda x: _color_jitter(x, keys["color_ops"], cfg), image)
    if channels == 3:
        image = _random_apply(keys["grayscale"], cfg.grayscale_p, to_grayscale, image)
    if cfg.gamma_p > 0:
        if not 0 < cfg.gamma_min <= cfg.gamma_max:
            raise ValueError(f"augment gamma range [{cfg.gamma_min}, {cfg.gamma_max}] must satisfy 0 < min <= max")
        # Log-uniform, so gamma and 1/gamma are equally likely for a symmetric range.
        gamma = jnp.exp(jax.random.uniform(keys["gamma_value"], minval=math.log(cfg.gamma_min),
                                           maxval=math.log(cfg.gamma_max)))
        image = _random_apply(keys["gamma"], cfg.gamma_p, lambda x: jnp.clip(x, 0.0, 1.0) ** gamma, image)
    if cfg.blur_p > 0:
        if not 0 < cfg.blur_sigma_min <= cfg.blur_sigma_max:
            raise ValueError(f"augment blur sigma range [{cfg.blur_sigma_min}, {cfg.blur_sigma_max}] must satisfy "
                             "0 < min <= max")
        sigma = jax.random.uniform(keys["blur_sigma"], minval=cfg.blur_sigma_min, maxval=cfg.blur_sigma_max)
        kernel_size = blur_kernel_size(height, cfg.blur_kernel_frac)
        image = _random_apply(keys["blur"], cfg.blur_p, lambda x: gaussian_blur(x, sigma, kernel_size=kernel_size),
                              image)
    image = _random_apply(keys["solarize"], cfg.solarize_p,
                          lambda x: jnp.where(x < cfg.solarize_threshold, x, 1.0 - x), image)
    return jnp.clip(image, 0.0, 1.0)


def augment_views(x: jax.Array, *, rng: jax.Array, cfg) -> jax.Array:
    """Augments a batch of images independently.

    Args:
      x: [..., H, W, C] images, e.g. the pipeline's uint16 views [B, 2, H, W, 1] (converted with `to_unit`)
        or floats in [0, 1]. Any leading axes; each image gets its own randomness.
      rng: one key for the whole batch (e.g. fold_in(base_key, step)).
      cfg: a `preset(...)` ConfigDict (read at trace time: its values are static).

    Returns:
      float32 array of the same shape, in [0, 1].
    """
    x = to_unit(x)
    if x.ndim < 3:
        raise ValueError(f"augment_views: images must be [..., H, W, C], got shape {x.shape}")
    *leading, height, width, channels = x.shape
    images = x.reshape((-1, height, width, channels))
    keys = jax.random.split(rng, images.shape[0])
    augmented = jax.vmap(lambda image, key: augment_image(image, key, cfg))(images, keys)
    return augmented.reshape(x.shape)


__all__ = ["PRESETS", "ROTATION_INTERPOLATIONS", "augment_image", "augment_views", "blur_kernel_size", "gaussian_blur", "hsv_to_rgb",
           "normalize", "preset", "rgb_to_hsv", "rotate", "to_grayscale", "to_unit"]
