"""Modality-aware intensities: every crop to float32 [0, 1] by the modality of its image, before the
photometric augmentation (Ghesu et al. train one model on radiography, CT, MR and ultrasound).

CT crops get a window preset sampled per crop (lung / soft tissue / bone, optionally jittered) applied to
their Hounsfield units; MR crops, in arbitrary units, are stretched between their own percentiles;
X-ray, ultrasound and everything else stay as stored. The pipeline delivers each record's
`modality_id`, `bits_stored` and `intensity_offset` (stored value = HU + offset for CT) next to its crops.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc

from medssl_jax import augment
from medssl_jax.data.modality import MODALITY_CT, MODALITY_MR, MODALITY_OTHER  # noqa: F401 (the ids callers pass)

# CT window presets (centre, width) in Hounsfield units.
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "mediastinum": (50.0, 350.0),
}


def config_fields() -> mlc.ConfigDict:
    """`config.intensity`: off by default (then crops stay as stored)."""
    i = mlc.ConfigDict()
    i.modality_aware = False  # needs batch fields modality_id, bits_stored, intensity_offset
    i.ct_windows = ("lung", "soft_tissue", "bone")  # presets of CT_WINDOWS sampled per crop
    i.ct_window_probs = ()  # () = uniform
    i.ct_window_jitter = 0.0  # relative jitter of centre (by width) and width, e.g. 0.1
    i.mr_percentiles = (1.0, 99.0)
    return i


def modality_intensity(
    x: jax.Array,
    *,
    modality_id: jax.Array,
    bits_stored: jax.Array,
    intensity_offset: jax.Array,
    rng: jax.Array,
    ct_windows: Sequence[tuple[float, float]] = (CT_WINDOWS["lung"], CT_WINDOWS["soft_tissue"], CT_WINDOWS["bone"]),
    ct_window_probs: Sequence[float] | None = None,
    ct_window_jitter: float = 0.0,
    mr_percentiles: tuple[float, float] = (1.0, 99.0),
) -> jax.Array:
    """Maps crops to float32 [0, 1] by their modality; pure, batched, jittable.

    Args:
      x: crops [B, n, H, W, C] (or [B, H, W, C]), uint16 as the pipeline delivers them (stored value
        rescaled to the full uint16 range: value / (2**bits_stored - 1) * 65535) or floats in [0, 1].
      modality_id: int, per sample [B] or per crop [B, n]: MODALITY_CT, MODALITY_MR, or MODALITY_OTHER
        (X-ray, US, ...: as stored).
      bits_stored: int [B] or [B, n], the record's bits_stored (to undo the full-range rescaling).
      intensity_offset: float [B] or [B, n]: stored value = raw modality value (HU for CT) + offset.
      rng: key for the window choice (one preset per crop, independently).
      ct_windows: (centre, width) presets in HU, e.g. CT_WINDOWS values.
      ct_window_probs: preset probabilities (None: uniform).
      ct_window_jitter: each crop's centre moves by up to +-jitter * width and its width scales by up
        to 1 +- jitter, uniformly.
      mr_percentiles: MR crops are mapped linearly from these percentiles (of the crop) to [0, 1].

    Returns:
      float32 array shaped like x with values in [0, 1].
    """
    unit = augment.to_unit(x)
    crop_shape = x.shape[:-3]  # one window per crop
    for name, value in (("modality_id", modality_id), ("bits_stored", bits_stored),
                        ("intensity_offset", intensity_offset)):
        if jnp.shape(value) not in (crop_shape[:1], crop_shape):
            raise ValueError(f"modality_intensity: {name} must have shape {crop_shape[:1]} (per sample) or "
                             f"{crop_shape} (per crop), got {jnp.shape(value)}")

    def per_sample(v, dtype=jnp.float32):
        v = jnp.asarray(v, dtype)
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

    # CT: raw HU from the stored value, then a window sampled per crop.
    full_range = jnp.exp2(per_sample(bits_stored)) - 1.0
    hu = unit * full_range - per_sample(intensity_offset)
    windows = jnp.asarray(ct_windows, jnp.float32)  # [W, 2]
    k_choice, k_centre, k_width = jax.random.split(rng, 3)
    probs = None if not ct_window_probs else jnp.asarray(ct_window_probs, jnp.float32)
    choice = jax.random.choice(k_choice, windows.shape[0], shape=crop_shape, p=probs)
    centre, width = windows[choice, 0], windows[choice, 1]
    if ct_window_jitter:
        centre = centre + width * ct_window_jitter * jax.random.uniform(k_centre, crop_shape, minval=-1, maxval=1)
        width = width * (1.0 + ct_window_jitter * jax.random.uniform(k_width, crop_shape, minval=-1, maxval=1))
    centre, width = centre[..., None, None, None], width[..., None, None, None]
    ct = jnp.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)

    # MR: arbitrary units, so map the crop's own percentile range to [0, 1].
    flat = unit.reshape(*crop_shape, -1)
    low, high = jnp.percentile(flat, jnp.asarray(mr_percentiles, jnp.float32), axis=-1)
    low, high = low[..., None, None, None], high[..., None, None, None]
    mr = jnp.clip((unit - low) / jnp.maximum(high - low, 1e-6), 0.0, 1.0)

    modality = per_sample(modality_id, jnp.int32)
    return jnp.where(modality == MODALITY_CT, ct, jnp.where(modality == MODALITY_MR, mr, unit))


def crops_to_unit(crops: jax.Array, batch: dict, *, rng: jax.Array, cfg) -> jax.Array:
    """Crop group [B, n, H, W, C] of `batch` -> float32 [0, 1]: by modality when `cfg.modality_aware`
    (`cfg` is config.intensity, see `config_fields`), else as stored."""
    if not cfg.modality_aware:
        return augment.to_unit(crops)
    missing = [k for k in ("modality_id", "bits_stored", "intensity_offset") if k not in batch]
    if missing:
        raise ValueError(f"cfg.modality_aware needs batch fields {missing} (see data_spec)")
    unknown = [w for w in cfg.ct_windows if w not in CT_WINDOWS]
    if unknown:
        raise ValueError(f"config.intensity.ct_windows has unknown presets {unknown}; known: {sorted(CT_WINDOWS)}")
    num = crops.shape[1]

    def per_crop(value):
        # [B] per element, or [B, 2] per source image (crop k comes from image k % 2, see the pipeline).
        return value[:, jnp.arange(num) % 2] if value.ndim == 2 else value

    return modality_intensity(
        crops,
        modality_id=per_crop(batch["modality_id"]),
        bits_stored=per_crop(batch["bits_stored"]),
        intensity_offset=per_crop(batch["intensity_offset"]),
        rng=rng,
        ct_windows=tuple(CT_WINDOWS[w] for w in cfg.ct_windows),
        ct_window_probs=tuple(cfg.ct_window_probs) or None,
        ct_window_jitter=cfg.ct_window_jitter,
        mr_percentiles=tuple(cfg.mr_percentiles),
    )
