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
from medssl_jax.evaluate import report


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
    forward=None,
) -> dict[str, Any]:
    """Extracts features of the train/test splits and runs the linear probe; returns the metrics dict."""
    kwargs = dict(
        image_size=probe_config.image_size,
        batch_size=probe_config.batch_size,
        mesh=mesh,
        feature=probe_config.feature,
        forward=forward or features_lib.feature_fn(model, probe_config.feature, mesh),
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
    return {
        "c": fitted["c"],
        "val_mean_auc_by_c": fitted["val_mean_auc_by_c"],
        "num_train": int(len(train["index"])),
        "_probs": fitted["probs"],
        "_labels": test["labels"],
        "_index": test["index"],
    }


def run_after_pretraining(export_dir: str, store: Store, probe_config, *, mesh, seed: int, workdir: str,
                          compute_dtype: str = "float32") -> dict[str, Any]:
    """Probes the exported encoder (-> WORKDIR/eval/) and a randomly initialised encoder of the same
    architecture (-> WORKDIR/baselines/random_init/eval/), both in the evaluation-workdir format that
    `python -m medssl_jax.compare` reads; WORKDIR/eval/summary.json also carries `random_init`."""
    variables, export_config = checkpoint.load_export(export_dir)
    model = models.build_encoder({**export_config["model"], "dtype": compute_dtype})
    source = export_config.get("source", {})
    common = dict(
        label_names=list(store.label_names), mode="linear_probe", split=probe_config.test_split,
        store_name=store.name, store_fingerprint=report.store_fingerprint(store.path),
    )
    logging_lib.log(f"linear probe on {probe_config.feature} features of {export_dir}")
    forward = features_lib.feature_fn(model, probe_config.feature, mesh)  # compiled once, used for both
    pretrained = probe_encoder(model, variables, store, probe_config, mesh=mesh, seed=seed,
                               cache_dir=os.path.join(workdir, "eval", "cache"), forward=forward)
    summary = report.write_eval(
        workdir, probs=_fill_unfit(pretrained["_probs"]), labels=pretrained["_labels"],
        record_ids=pretrained["_index"], method=source.get("method", ""), init=export_dir,
        extra={"probe_c": pretrained["c"], "val_mean_auc_by_c": pretrained["val_mean_auc_by_c"], "source": source},
        **common,
    )
    if probe_config.random_baseline:
        channels = int(export_config.get("input", {}).get("channels", 1))
        size = probe_config.image_size
        random_vars = jax.jit(lambda key: model.init(key, np.zeros((1, size, size, channels), np.float32),
                                                     train=False))(jax.random.PRNGKey(seed + 1))
        logging_lib.log("linear probe on a randomly initialised encoder of the same architecture (baseline)")
        baseline = probe_encoder(model, random_vars, store, probe_config, mesh=mesh, seed=seed, forward=forward)
        baseline_summary = report.write_eval(
            os.path.join(workdir, "baselines", "random_init"), probs=_fill_unfit(baseline["_probs"]),
            labels=baseline["_labels"], record_ids=baseline["_index"], method="none", init="random",
            extra={"probe_c": baseline["c"]}, **common,
        )
        summary["random_init"] = {
            "mean_auc": baseline_summary["mean_auc"],
            "per_label_auc": baseline_summary["per_label_auc"],
            "workdir": os.path.join(workdir, "baselines", "random_init"),
        }
        path = os.path.join(workdir, "eval", "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    return summary


def _fill_unfit(probs: np.ndarray) -> np.ndarray:
    """A label the probe could not fit (one class in train) scores 0.5 everywhere: AUC 0.5, not a crash."""
    return np.nan_to_num(probs, nan=0.5)
