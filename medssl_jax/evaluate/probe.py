"""Linear probe: multi-label logistic regression on frozen encoder features.

The probe fits one L2-regularised logistic regression per label (scikit-learn) on standardised
features of the labelled train split. The regularisation C is chosen on a patient-wise validation part
of the train split (never on test), then the probe is refit on the whole train split and scored on the
held-out test split. A record with a missing label is left out for that label only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import scipy.special
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from medssl_jax import checkpoint, logging_lib, models
from medssl_jax.data.store import Store
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import metrics, report


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


@dataclasses.dataclass
class LinearProbe:
    """Standardisation + one logistic regression per label: probs = sigmoid(((x - mean) / std) @ w + b)."""

    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    w: np.ndarray  # [D, L]
    b: np.ndarray  # [L]
    fitted: np.ndarray  # [L] bool; an unfit label has w = 0, b = 0 (probability 0.5)

    def logits(self, x) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.w + self.b

    def predict(self, x) -> np.ndarray:
        return scipy.special.expit(self.logits(x))


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, *, mean=None, std=None) -> LinearProbe:
    """Per-label L2 logistic regression (scikit-learn, lbfgs) on standardised features; NaN labels are
    left out for their label only."""
    mean = x.mean(axis=0) if mean is None else mean
    std = x.std(axis=0) + 1e-6 if std is None else std
    xs = (x - mean) / std
    w = np.zeros((x.shape[1], y.shape[1]), np.float32)
    b = np.zeros(y.shape[1], np.float32)
    fitted = np.zeros(y.shape[1], bool)
    for j in range(y.shape[1]):
        keep = ~np.isnan(y[:, j])
        if len(np.unique(y[keep, j])) < 2:
            continue
        clf = LogisticRegression(C=c, max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xs[keep], y[keep, j])
        w[:, j], b[j], fitted[j] = clf.coef_[0], clf.intercept_[0], True
    return LinearProbe(mean.astype(np.float32), std.astype(np.float32), w, b, fitted)


def select_and_fit(x_train, y_train, x_val, y_val, *, c_grid, label_names) -> tuple[LinearProbe, float, dict]:
    """Fits the probe for every C, picks the best validation mean AUC (ties: the smaller C, stronger L2)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    best, best_c, best_auc, by_c = None, None, -np.inf, {}
    for c in sorted(float(c) for c in c_grid):
        fitted = fit_probe(x_train, y_train, c, mean=mean, std=std)
        auc = metrics.evaluate_predictions(probs=fitted.predict(x_val), labels=y_val,
                                           label_names=label_names)["mean_auc"]
        by_c[c] = auc
        if best is None or (auc is not None and auc > best_auc):
            best, best_c, best_auc = fitted, c, (auc if auc is not None else -np.inf)
    return best, best_c, by_c



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
    """Chooses C on a patient-wise validation part of train, refits on all of train, predicts test.

    (The linear_probe mode keeps the validation patients out of the final fit instead, so that its
    label fractions are exactly the labelled data the probe saw.)
    """
    held = patient_split(train_patients, fraction=val_fraction, seed=seed)
    if held.all() or not held.any():
        raise ValueError(f"probe.val_fraction={val_fraction} leaves no patients for fitting or validation")
    names = [str(j) for j in range(train_labels.shape[1])]
    _, best_c, val_auc = select_and_fit(train_features[~held], train_labels[~held], train_features[held],
                                        train_labels[held], c_grid=c_grid, label_names=names)
    test_probs = fit_probe(train_features, train_labels, best_c).predict(test_features)
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
        workdir, probs=pretrained["_probs"], labels=pretrained["_labels"],
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
            os.path.join(workdir, "baselines", "random_init"), probs=baseline["_probs"],
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
