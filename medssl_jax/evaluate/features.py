"""Frozen-encoder features for every record of a split: one jitted forward over the global batch.

Features are computed once per (encoder, split, image size) and cached as `.npz` in the caller's
directory, so a probe with another regularisation or label fraction never re-runs the encoder. Also the
host-side helpers every evaluation shares: eval-preprocessed images of a list of records (`load_images`)
and a jitted function applied over the mesh to a batch of any size (`padded_apply`).
"""

from __future__ import annotations

import os
import time
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


def recalibrate_batch_stats(model: nn.Module, variables: Any, store: Store, ids: np.ndarray, *, image_size: int,
                            batch_size: int, mesh, max_images: int = 4096,
                            momentum: float | None = None) -> tuple[Any, int]:
    """BatchNorm statistics of `variables` recomputed on the store records `ids` ("precise BN").

    A randomly initialised encoder carries the initial running statistics (mean 0, variance 1), which
    describe no image, so its features would be a crippled baseline. Here full batches of up to
    `max_images` of the records (in the given order, eval preprocessing: centre square, resize) go through
    the encoder in training mode, which normalises every layer with the batch's own statistics; the
    per-batch means and variances of every BatchNorm layer are pooled into a population mean and variance
    (E[x^2] - E[x]^2 over all batches), as PreciseBN does (Wu & Johnson 2021). Returns (variables with the
    new batch_stats, number of images used). Encoders without BatchNorm (ViT) come back unchanged, 0 images.

    Flax updates running statistics as momentum * old + (1 - momentum) * batch; starting every batch from
    zeros, the update is (1 - momentum) * the batch's statistic, which is divided back out.
    """
    if not variables.get("batch_stats"):
        return variables, 0
    if momentum is None:
        from medssl_jax.models.resnet import BN_MOMENTUM as momentum  # every BatchNorm of our encoders
    devices = mesh.devices.size
    batch_size = max(devices, (batch_size // devices) * devices)
    ids = np.asarray(ids, np.int64)
    usable = min(len(ids), max_images) // batch_size * batch_size
    if usable == 0:
        raise ValueError(f"store {store.path}: {len(ids)} images, fewer than one batch of {batch_size}, to "
                         "recompute BatchNorm statistics on (lower the batch size)")
    zeros = jax.tree.map(np.zeros_like, jax.device_get(variables["batch_stats"]))

    def batch_moments(params, images):
        _, updates = model.apply({"params": params, "batch_stats": zeros}, augment.to_unit(images), train=True,
                                 mutable=["batch_stats"])
        stats = jax.tree.map(lambda s: s / (1.0 - momentum), updates["batch_stats"])
        return _map_bn(stats, lambda t: {"mean": t["mean"], "second": t["var"] + t["mean"] ** 2})

    moments = jax.jit(batch_moments, in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    params = sharding.replicate(variables["params"], mesh)
    load = pipeline.LoadForEval(store.data_source(), image_size=image_size, channels=store.channels(ids),
                                num_labels=len(store.label_names))
    sums = None
    for start in range(0, usable, batch_size):
        images = np.stack([load.map(int(i))["image"] for i in ids[start:start + batch_size]])
        batch = jax.device_get(moments(params, jax.device_put(images, sharding.data_sharding(mesh))))
        batch = jax.tree.map(lambda x: np.asarray(x, np.float64), batch)
        sums = batch if sums is None else jax.tree.map(np.add, sums, batch)
    num_batches = usable // batch_size
    pooled = _map_bn(sums, lambda t: {
        "mean": (t["mean"] / num_batches).astype(np.float32),
        "var": np.maximum(t["second"] / num_batches - (t["mean"] / num_batches) ** 2, 0.0).astype(np.float32)})
    return {**variables, "batch_stats": pooled}, usable


def _map_bn(tree: dict, fn) -> dict:
    """Applies fn to every BatchNorm statistics dict (keys 'mean' and 'var' or 'second') of a nested tree."""
    if "mean" in tree and not isinstance(tree["mean"], dict):
        return fn(tree)
    return {k: _map_bn(v, fn) for k, v in tree.items()}


def load_images(store: Store, ids: np.ndarray, *, image_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint16 [N, S, S, C] eval-preprocessed images and labels [N, L] of `ids`, in `ids` order."""
    load = pipeline.LoadForEval(store.data_source(), image_size=image_size, channels=store.channels(ids),
                                num_labels=len(store.label_names))
    images, labels = [], []
    for start in range(0, len(ids), batch_size):
        items = [load.map(int(i)) for i in ids[start:start + batch_size]]
        images.append(np.stack([item["image"] for item in items]))
        labels.append(np.stack([item["labels"] for item in items]))
    return np.concatenate(images), np.concatenate(labels)


def padded_apply(fn, images, mesh):
    """fn on a batch padded to a multiple of the device count and split over the mesh, cropped back."""
    images = np.asarray(images)
    n = images.shape[0]
    pad = (-n) % mesh.devices.size
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    return np.asarray(fn(jax.device_put(images, sharding.data_sharding(mesh))))[:n]


def bench_features(model, variables, *, image_size: int, channels: int, batch_size: int, mesh, feature="pre_logits",
                   steps: int = 20) -> dict:
    """Images/s of the jitted feature forward (features.feature_fn) on a synthetic uint16 batch, device only."""
    forward = feature_fn(model, feature, mesh)
    variables = sharding.replicate(variables, mesh)
    batch = jax.device_put(np.random.default_rng(0).integers(0, 65535, (batch_size, image_size, image_size, channels),
                                                             dtype=np.uint16), sharding.data_sharding(mesh))
    start = time.perf_counter()
    forward(variables, batch).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = forward(variables, batch)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / seconds, "compile_s": compile_s, "batch_size": batch_size,
            "image_size": image_size, "devices": int(mesh.devices.size), "platform": jax.devices()[0].platform}
