"""The input normalisation an encoder was trained with, applied inside the encoder (`input_mean`/`input_std`).

Our own pretraining feeds pixels in [0, 1] and records none. Converted encoders record what their
training used (DINOv2 hub and torchvision: ImageNet mean/std; timm's augreg ViTs: 0.5/0.5; a
transformers directory: its preprocessor_config.json, e.g. RAD-DINO's own values), so every consumer
that builds the encoder from an export (probe, fine-tune, feature extraction) feeds it what it expects.
A grey image given to an encoder with 3-channel values is replicated to RGB first and normalised per
channel, so its first layer keeps its 3 input channels and the result is exactly what the weights saw.
(Only an explicit `convert --in_chans=1`, which sums the first layer over RGB, records the channel
means instead: approximate.)
"""

from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_input(x, mean, std):
    """(x - mean) / std over the channel axis of float images x [..., C]; () = unchanged."""
    if not mean and not std:
        return x
    if len(mean) != len(std) or not len(mean) or any(s <= 0 for s in std):
        raise ValueError(f"encoder input_mean={tuple(mean)} / input_std={tuple(std)}: need the same number of "
                         "values (one per channel) and std > 0")
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    channels = x.shape[-1]
    if channels != mean.shape[0]:
        if channels != 1:
            raise ValueError(f"encoder input has {channels} channels, its input_mean has {mean.shape[0]} values")
        x = jnp.broadcast_to(x, (*x.shape[:-1], mean.shape[0]))
    return ((x.astype(jnp.float32) - mean) / std).astype(x.dtype)


def recorded(model_config) -> dict | None:
    """What an export's `input.normalization` says for an encoder built from `model_config`: its mean/std,
    or None (pixels in [0, 1]: our own pretraining)."""
    mean, std = model_config.get("input_mean") or (), model_config.get("input_std") or ()
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]} if mean else None
