"""Robustness curves (Ghesu): AUC under graded perturbations; convergence speed; label-efficiency bookkeeping.

Perturbations are pure, batched jnp functions of float images in [0, 1] shaped [..., H, W, C] (jit-able, so
they run on the accelerator next to the model):
- "intensity": x * factor, clipped to [0, 1]            (identity 1.0)
- "gamma":     x ** gamma                               (identity 1.0)
- "rotation":  rotation by `degrees` about the image centre, counter-clockwise as displayed, bilinear,
               zero fill                                (identity 0)
- "zoom":      scaling by `factor` about the centre (> 1 magnifies, < 1 shrinks with zero border),
               bilinear                                 (identity 1.0)
The exact strengths of Ghesu et al. are not given in the paper or its supplement;
DEFAULT_GRID is our choice and every curve records its strengths.

Convergence (Ghesu, our reading of their "% reduction in training iterations", an interpretation): with
validation AUC logged against training step for a fine-tuning run from the SSL init and one from random
init, target = the random-init run's best validation AUC, S_random = the first logged step at which the
random-init run reaches it, S_ssl = the first logged step at which the SSL run reaches >= target;
reduction = 100 * (1 - S_ssl / S_random) %. Steps are known only at the evaluation interval, which bounds
the resolution. If the SSL run never reaches the target the reduction is undefined (None, with a note).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax.evaluate import bootstrap, metrics

PERTURBATIONS = ("intensity", "gamma", "rotation", "zoom")
IDENTITY = {"intensity": 1.0, "gamma": 1.0, "rotation": 0.0, "zoom": 1.0}
DEFAULT_GRID = {
    "intensity": (0.5, 0.75, 1.0, 1.25, 1.5),
    "gamma": (0.5, 0.75, 1.0, 1.5, 2.0),
    "rotation": (0.0, 5.0, 10.0, 20.0, 30.0, 45.0),
    "zoom": (0.8, 0.9, 1.0, 1.1, 1.25),
}


class RobustnessError(ValueError):
    """Bad input to robustness / convergence / label-efficiency helpers (one line naming the input)."""


def scale_intensity(images, factor):
    return jnp.clip(images * factor, 0.0, 1.0)


def adjust_gamma(images, gamma):
    return jnp.clip(images, 0.0, 1.0) ** gamma


def _resample(images, src_rows, src_cols):
    """Bilinear sampling of [..., H, W, C] images at source coordinates [H, W] (zero outside)."""
    shape = images.shape
    flat = jnp.moveaxis(images.reshape((-1,) + shape[-3:]), -1, 1).reshape((-1,) + shape[-3:-1])
    sample = lambda img: jax.scipy.ndimage.map_coordinates(  # noqa: E731
        img, [src_rows, src_cols], order=1, mode="constant", cval=0.0)
    out = jax.vmap(sample)(flat)
    out = out.reshape((-1, shape[-1]) + shape[-3:-1])
    return jnp.moveaxis(out, 1, -1).reshape(shape)


def _centred_grid(height, width):
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    return rows - (height - 1) / 2, cols - (width - 1) / 2


def rotate(images, degrees):
    height, width = images.shape[-3:-1]
    r, c = _centred_grid(height, width)
    theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    # Output pixel (r, c) takes the source pixel rotated back by -theta (row axis points down).
    src_r = jnp.cos(theta) * r + jnp.sin(theta) * c
    src_c = jnp.cos(theta) * c - jnp.sin(theta) * r
    return _resample(images, src_r + (height - 1) / 2, src_c + (width - 1) / 2)


def zoom(images, factor):
    height, width = images.shape[-3:-1]
    r, c = _centred_grid(height, width)
    return _resample(images, r / factor + (height - 1) / 2, c / factor + (width - 1) / 2)


_FUNCTIONS = {"intensity": scale_intensity, "gamma": adjust_gamma, "rotation": rotate, "zoom": zoom}


def check_strength(kind: str, strength) -> float:
    if kind not in _FUNCTIONS:
        raise RobustnessError(f"perturbation: unknown {kind!r}, expected one of {PERTURBATIONS}")
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise RobustnessError(f"{kind} strength: not a number: {strength!r}") from None
    if not math.isfinite(value):
        raise RobustnessError(f"{kind} strength: must be finite, got {strength!r}")
    if kind in ("gamma", "zoom") and value <= 0:
        raise RobustnessError(f"{kind} strength: must be > 0, got {value}")
    if kind == "intensity" and value < 0:
        raise RobustnessError(f"intensity strength: must be >= 0, got {value}")
    return value


@functools.partial(jax.jit, static_argnames="kind")
def _perturb_jit(images, strength, *, kind):
    return _FUNCTIONS[kind](images, strength)


def perturb(images, kind: str, strength):
    """Applies perturbation `kind` at `strength` to float images [..., H, W, C] in [0, 1] (jitted)."""
    strength = check_strength(kind, strength)
    images = jnp.asarray(images, jnp.float32)
    if images.ndim < 3:
        raise RobustnessError(f"images: expected [..., H, W, C], got shape {images.shape}")
    return _perturb_jit(images, jnp.float32(strength), kind=kind)


def to_unit_float(batch: np.ndarray) -> np.ndarray:
    """uint8 / uint16 -> float32 in [0, 1] (full-range scaling); float input is passed through."""
    batch = np.asarray(batch)
    if batch.dtype == np.uint8:
        return batch.astype(np.float32) / 255.0
    if batch.dtype == np.uint16:
        return batch.astype(np.float32) / 65535.0
    if np.issubdtype(batch.dtype, np.floating):
        return batch.astype(np.float32)
    raise RobustnessError(f"images: dtype {batch.dtype} not supported (uint8, uint16 or float in [0, 1])")


def check_grid(grid: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]]:
    grid = DEFAULT_GRID if grid is None else grid
    if not grid:
        raise RobustnessError("grid: empty")
    out = {}
    for kind, strengths in grid.items():
        if kind not in _FUNCTIONS:
            raise RobustnessError(f"grid: unknown perturbation {kind!r}, expected one of {PERTURBATIONS}")
        values = [check_strength(kind, s) for s in strengths]
        if not values:
            raise RobustnessError(f"grid[{kind!r}]: no strengths")
        out[kind] = values
    return out


def robustness_curves(predict_fn: Callable[[np.ndarray], np.ndarray], images, labels,
                      grid: Mapping[str, Sequence[float]] | None = None, *,
                      label_names: Sequence[str] | None = None, batch_size: int = 256,
                      num_resamples: int = 1000) -> dict:
    """AUC of `predict_fn` on perturbed test images, per perturbation and strength.

    predict_fn: float32 images [b, H, W, C] in [0, 1] (a jax.Array, already perturbed on the default
    device) -> probabilities [b, L] (numpy or jax array).
    images: [N, H, W, C] or [N, H, W] (uint8, uint16 or float in [0, 1]); converted and perturbed batch
    by batch, so a uint16 test set never has to exist as float32 all at once. labels: [N, L], NaN missing.
    Returns {kind: [{"strength", "mean_auc", "ci_low", "ci_high", "per_label": {name: auc or None}}, ...]}
    (JSON-serialisable): the mean AUC's 95% bootstrap CI over `num_resamples` resamples of the test
    images (the same resamples at every strength; 0 = no CI).
    """
    grid = check_grid(grid)
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise RobustnessError(f"images: expected [N, H, W, C] or [N, H, W], got shape {images.shape}")
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise RobustnessError(f"labels: expected [{images.shape[0]}, L], got shape {labels.shape}")
    if batch_size < 1:
        raise RobustnessError(f"batch_size: must be >= 1, got {batch_size}")
    curves = {}
    for kind, strengths in grid.items():
        entries = []
        for strength in strengths:
            probs = []
            for start in range(0, len(images), batch_size):
                batch = perturb(to_unit_float(images[start:start + batch_size]), kind, strength)
                out = np.asarray(predict_fn(batch), np.float64)
                if out.shape != (len(batch), labels.shape[1]):
                    raise RobustnessError(f"predict_fn: returned shape {out.shape}, expected "
                                          f"{(len(batch), labels.shape[1])}")
                probs.append(out)
            names = list(label_names or [f"label_{j}" for j in range(labels.shape[1])])
            probs = np.concatenate(probs)
            res = metrics.evaluate_predictions(probs=probs, labels=labels, label_names=names)
            ci = {"ci_low": None, "ci_high": None}
            if num_resamples:
                boot = bootstrap.paired_bootstrap(probs={"model": probs}, labels=labels, label_names=names,
                                                  num_resamples=num_resamples, youden=False)
                ci = {k: boot["models"]["model"]["mean_auc"][k] for k in ci}
            entries.append({"strength": strength, "mean_auc": res["mean_auc"], **ci,
                            "per_label": {n: v["auc"] for n, v in res["per_label"].items()}})
        curves[kind] = entries
    return curves


def read_curve(curve, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(curve, Mapping):
        if "steps" not in curve or "val_auc" not in curve:
            raise RobustnessError(f"{name}: expected keys 'steps' and 'val_auc', got {sorted(curve)}")
        steps, values = curve["steps"], curve["val_auc"]
    else:
        try:
            steps, values = zip(*curve)
        except (TypeError, ValueError):
            raise RobustnessError(f"{name}: expected {{'steps': [...], 'val_auc': [...]}} or "
                                  "[(step, val_auc), ...]") from None
    steps = np.asarray(steps, np.float64)
    values = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if steps.ndim != 1 or steps.shape != values.shape or len(steps) == 0:
        raise RobustnessError(f"{name}: steps and val_auc must be equal-length non-empty lists")
    if np.any(np.diff(steps) <= 0):
        raise RobustnessError(f"{name}: steps must be strictly increasing")
    if np.all(np.isnan(values)):
        raise RobustnessError(f"{name}: no defined validation AUC")
    return steps, values


def steps_to_reach(curve, target: float, *, name: str = "curve") -> float | None:
    """First logged step whose validation AUC is >= target, or None."""
    steps, values = read_curve(curve, name)
    hit = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= target)
    return float(steps[hit[0]]) if hit.size else None


def convergence_reduction(*, ssl_curve, random_curve) -> dict:
    """Ghesu-style convergence: % fewer steps for the SSL init to reach random init's best val AUC."""
    r_steps, r_values = read_curve(random_curve, "random_curve")
    read_curve(ssl_curve, "ssl_curve")
    target = float(np.nanmax(r_values))
    random_steps = float(r_steps[np.nanargmax(r_values)])
    ssl_steps = steps_to_reach(ssl_curve, target, name="ssl_curve")
    note = None
    if ssl_steps is None:
        reduction = None
        note = f"SSL run never reached the random-init best validation AUC {target:.4f}"
    elif random_steps <= 0:
        reduction = None
        note = "random-init run reached its best at step 0; reduction undefined"
    else:
        reduction = 100.0 * (1.0 - ssl_steps / random_steps)
    return {"target_val_auc": target, "random_steps": random_steps, "ssl_steps": ssl_steps,
            "reduction_pct": reduction, "note": note}


def label_efficiency_entry(*, fraction: float, probs, labels, label_names: Sequence[str],
                           num_train: int | None = None, num_resamples: int = 1000, seed: int = 0) -> dict:
    """One point of a label-efficiency curve: mean test AUC (and per label) with a bootstrap CI."""
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise RobustnessError(f"fraction: must be in (0, 1], got {fraction}")
    res = bootstrap.paired_bootstrap(probs={"model": probs}, labels=labels, label_names=label_names,
                                     num_resamples=num_resamples, seed=seed, youden=False)
    m = res["models"]["model"]
    return {"fraction": fraction, "num_train": None if num_train is None else int(num_train),
            "mean_auc": m["mean_auc"]["point"], "ci_low": m["mean_auc"]["ci_low"],
            "ci_high": m["mean_auc"]["ci_high"],
            "per_label_auc": {n: m["per_label"][n]["auc"]["point"] for n in res["label_names"]}}


def label_efficiency_curve(entries: Sequence[Mapping]) -> list[dict]:
    """Validates label-efficiency entries and returns them sorted by fraction (duplicates refused)."""
    out = []
    for i, e in enumerate(entries):
        for key in ("fraction", "mean_auc"):
            if key not in e:
                raise RobustnessError(f"label_fractions entry {i}: missing {key!r}")
        f = float(e["fraction"])
        if not 0 < f <= 1:
            raise RobustnessError(f"label_fractions entry {i}: fraction must be in (0, 1], got {f}")
        out.append({**e, "fraction": f})
    fractions = [e["fraction"] for e in out]
    if len(set(fractions)) != len(fractions):
        raise RobustnessError(f"label_fractions: duplicate fractions in {sorted(fractions)}")
    return sorted(out, key=lambda e: e["fraction"])
