"""Linear probe: multi-label logistic regression on frozen encoder features.

The probe fits one L2-regularised logistic regression per label (scikit-learn) on standardised
features of the labelled train split. The regularisation C is chosen on a patient-wise validation part
of the train split (never on test), then the probe is refit on the whole train split and scored on the
held-out test split. A record with a missing label is left out for that label only.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medssl_jax import checkpoint, logging_lib, models
from medssl_jax.data.store import Store
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import metrics


def patient_split(patients: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Deterministic patient-wise mask: True for records whose patient falls in the held-out `fraction`.

    Uses a hash of (seed, patient key), so the split does not depend on record order or on which
    other patients are present, and every run comparing encoders gets the same split.
    """
    def bucket(key: str) -> float:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    unique = np.unique(patients)
    held = {p for p in unique if bucket(str(p)) < fraction}
    return np.array([p in held for p in patients], dtype=bool)


def _fit_predict(x_fit, y_fit, x_eval, c: float) -> np.ndarray:
    """Per-label logistic regression; returns [N_eval, L] probabilities (NaN where a label can't be fit)."""
    probs = np.full((x_eval.shape[0], y_fit.shape[1]), np.nan)
    for j in range(y_fit.shape[1]):
        keep = ~np.isnan(y_fit[:, j])
        y = y_fit[keep, j]
        if len(np.unique(y)) < 2:
            continue
        clf = LogisticRegression(C=c, max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_fit[keep], y)
        probs[:, j] = clf.predict_proba(x_eval)[:, 1]
    return probs


def _mean_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    aucs = []
    for j in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, j]) & ~np.isnan(probs[:, j])
        if keep.any() and len(np.unique(labels[keep, j])) == 2:
            aucs.append(roc_auc_score(labels[keep, j], probs[keep, j]))
    return float(np.mean(aucs)) if aucs else float("nan")


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_patients: np.ndarray,
    test_features: np.ndarray,
    *,
    c_grid,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Chooses C on a patient-wise validation part of train, refits on all of train, predicts test."""
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    x_train = (train_features - mean) / std
    x_test = (test_features - mean) / std
    held = patient_split(train_patients, fraction=val_fraction, seed=seed)
    if held.all() or not held.any():
        raise ValueError(f"probe.val_fraction={val_fraction} leaves no patients for fitting or validation")
    val_auc = {}
    for c in c_grid:
        val_probs = _fit_predict(x_train[~held], train_labels[~held], x_train[held], c)
        val_auc[float(c)] = _mean_auc(val_probs, train_labels[held])
    finite = {c: a for c, a in val_auc.items() if np.isfinite(a)}
    best_c = max(finite, key=finite.get) if finite else float(c_grid[len(c_grid) // 2])
    test_probs = _fit_predict(x_train, train_labels, x_test, best_c)
    return {"probs": test_probs, "c": best_c, "val_mean_auc_by_c": val_auc}


def probe_encoder(
    model,
    variables,
    store: Store,
    probe_config,
    *,
    mesh,
    seed: int,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Extracts features of the train/test splits and runs the linear probe; returns the metrics dict."""
    kwargs = dict(
        image_size=probe_config.image_size,
        batch_size=probe_config.batch_size,
        mesh=mesh,
        feature=probe_config.feature,
    )
    train = features_lib.extract(
        model, variables, store, split=probe_config.train_split,
        cache_path=cache_dir and os.path.join(cache_dir, f"features_{probe_config.train_split}.npz"), **kwargs,
    )
    test = features_lib.extract(
        model, variables, store, split=probe_config.test_split,
        cache_path=cache_dir and os.path.join(cache_dir, f"features_{probe_config.test_split}.npz"), **kwargs,
    )
    fitted = fit_linear_probe(
        train["features"], train["labels"], store.patients[train["index"]], test["features"],
        c_grid=tuple(probe_config.c_grid), val_fraction=probe_config.val_fraction, seed=seed,
    )
    result = metrics.evaluate_predictions(
        probs=np.nan_to_num(fitted["probs"], nan=0.5), labels=test["labels"], label_names=store.label_names
    )
    result["per_label_auc"] = {name: entry["auc"] for name, entry in result["per_label"].items()}
    result["c"] = fitted["c"]
    result["val_mean_auc_by_c"] = fitted["val_mean_auc_by_c"]
    result["num_train"] = int(len(train["index"]))
    result["num_test"] = int(len(test["index"]))
    return result | {"_probs": fitted["probs"], "_labels": test["labels"], "_index": test["index"]}


def run_after_pretraining(export_dir: str, store: Store, probe_config, *, mesh, seed: int, workdir: str,
                          compute_dtype: str = "float32") -> dict[str, Any]:
    """Probes the exported encoder and a randomly initialised one; writes WORKDIR/eval/summary.json."""
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    variables, export_config = checkpoint.load_export(export_dir)
    model = models.build_encoder({**export_config["model"], "dtype": compute_dtype})
    logging_lib.log(f"linear probe on {probe_config.feature} features of {export_dir}")
    pretrained = probe_encoder(model, variables, store, probe_config, mesh=mesh, seed=seed,
                               cache_dir=os.path.join(eval_dir, "cache"))
    summary = {
        "mean_auc": pretrained["mean_auc"],
        "per_label_auc": pretrained["per_label_auc"],
        "label_names": list(store.label_names),
        "init": export_dir,
        "source": export_config.get("source", {}),
        "probe": {k: v for k, v in pretrained.items() if not k.startswith("_")},
    }
    np.savez(
        os.path.join(eval_dir, "predictions.npz"),
        probs=pretrained["_probs"], labels=pretrained["_labels"], index=pretrained["_index"],
        label_names=np.array(store.label_names),
    )
    if probe_config.random_baseline:
        channels = int(export_config.get("input", {}).get("channels", 1))
        size = probe_config.image_size
        random_vars = jax.jit(lambda key: model.init(key, np.zeros((1, size, size, channels), np.float32),
                                                     train=False))(jax.random.PRNGKey(seed + 1))
        logging_lib.log("linear probe on a randomly initialised encoder of the same architecture (baseline)")
        baseline = probe_encoder(model, random_vars, store, probe_config, mesh=mesh, seed=seed)
        summary["random_init"] = {
            "mean_auc": baseline["mean_auc"],
            "per_label_auc": baseline["per_label_auc"],
            "c": baseline["c"],
        }
    with open(os.path.join(eval_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary
