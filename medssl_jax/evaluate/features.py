"""Frozen-encoder features for every record of a split: one jitted forward over the global batch.

Features are computed once per (encoder, split, image size) and cached as `.npz` in the caller's
directory, so a probe with another regularisation or label fraction never re-runs the encoder.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from medssl_jax import augment, logging_lib, sharding
from medssl_jax.data import pipeline
from medssl_jax.data.store import Store


def feature_fn(model: nn.Module, feature: str, mesh):
    """Jitted (variables, uint16 images [B, H, W, C]) -> float32 features [B, D] named `feature`."""

    def forward(variables, images):
        _, out = model.apply(variables, augment.to_unit(images), train=False)
        if feature not in out:
            raise KeyError(f"probe feature {feature!r} is not an output of the encoder (has {sorted(out)})")
        value = out[feature]
        if value.ndim > 2:  # e.g. a spatial map: average-pool it
            value = value.mean(axis=tuple(range(1, value.ndim - 1)))
        return value.astype(np.float32)

    return jax.jit(
        forward,
        in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
        out_shardings=sharding.data_sharding(mesh),
    )


def extract(
    model: nn.Module,
    variables: Any,
    store: Store,
    *,
    split: str,
    image_size: int,
    batch_size: int,
    mesh,
    feature: str = "pre_logits",
    cache_path: str | None = None,
    forward=None,
) -> dict[str, np.ndarray]:
    """Returns {"features" [N, D], "labels" [N, L], "index" [N]} for every record of `split`, in store order.

    Pass the same `forward` (from `feature_fn`) to repeated calls so the encoder compiles once.
    """
    if cache_path and os.path.exists(cache_path):
        with np.load(cache_path) as cached:
            return {k: cached[k] for k in cached.files}
    devices = mesh.devices.size
    batch_size = max(devices, (batch_size // devices) * devices)
    forward = forward or feature_fn(model, feature, mesh)
    variables = sharding.replicate(variables, mesh)
    features, labels, index = [], [], []
    iterator = pipeline.make_eval_iterator(
        store, split=split, image_size=image_size, batch_size_per_host=sharding.per_host(batch_size)
    )
    total = len(store.ids(split))
    progress = logging_lib.Progress(max(1, -(-total // batch_size)), items_per_step=batch_size, unit="images")
    for step, local in enumerate(iterator, start=1):
        global_batch = sharding.to_global({"image": local["image"]}, mesh)
        out = forward(variables, global_batch["image"])
        out = multihost_utils.process_allgather(out, tiled=True)
        rest = multihost_utils.process_allgather(
            {k: local[k] for k in ("labels", "index", "mask")}, tiled=True
        )
        keep = np.asarray(rest["mask"]).astype(bool)
        features.append(np.asarray(out)[keep])
        labels.append(np.asarray(rest["labels"])[keep])
        index.append(np.asarray(rest["index"])[keep])
        if step % 20 == 0:
            progress.update(step)
            logging_lib.log(f"features {split}: " + progress.line(step))
    result = {
        "features": np.concatenate(features).astype(np.float32),
        "labels": np.concatenate(labels).astype(np.float32),
        "index": np.concatenate(index).astype(np.int64),
    }
    order = np.argsort(result["index"], kind="stable")
    result = {k: v[order] for k, v in result.items()}
    if len(result["index"]) != total:
        raise RuntimeError(f"feature extraction of split {split!r} saw {len(result['index'])} of {total} records")
    if cache_path and jax.process_index() == 0:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        np.savez(cache_path, **result)
    return result
