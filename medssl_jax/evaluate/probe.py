"""Linear probe: multi-label logistic regression on frozen encoder features, and the probe that ends
every pretraining run.

The probe fits one L2-regularised logistic regression per label (scikit-learn) on standardised
features of the train patients; the regularisation C is chosen on the validation patients (never on
test) and the fitted probe scores the held-out test split. A record with a missing label is left out
for that label only. The linear_probe mode (evaluate/linear_probe.py) runs this fitter; so does
`run_after_pretraining`, through that mode, once for the export and once for a fair random-init
encoder of the same architecture, followed by their paired bootstrap comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

import numpy as np
import scipy.special
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from medssl_jax import logging_lib
from medssl_jax.data.store import Store
from medssl_jax.evaluate import metrics


# Inverse L2 strengths tried on the validation patients; wide on purpose (random features often want the
# weakest regularisation); a choice at either end is logged as a warning.
C_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)


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



def skip_reason(store: Store, probe_config) -> str | None:
    """Why the end-of-pretraining probe cannot run on `store` (None when it can): no labels, or an empty
    train or test split. Unlabelled, test-less stores are the normal case for pretraining."""
    return unlabelled_reason(store, train=probe_config.train_split, test=probe_config.test_split)


def unlabelled_reason(store: Store, *, train: str, test: str) -> str | None:
    """Why `store` cannot be evaluated with labels on its `train` and `test` splits, or None."""
    if not store.label_names:
        return f"store {store.path} has no labels"
    labelled = ~np.all(np.isnan(store.labels), axis=1) if store.labels.size else np.zeros(len(store), bool)
    for role, split in (("train", train), ("test", test)):
        ids = store.ids(split)
        if len(ids) == 0:
            return f"store {store.path} has no {split!r} split (the {role} split)"
        if not labelled[ids].any():
            return f"the {split!r} split of store {store.path} has no labelled record"
    return None


def probe_eval_config(export_dir: str, data_config, probe_config, *, mesh, seed: int, compute_dtype: str):
    """The linear_probe-mode config of the end-of-pretraining probe of `export_dir` on the run's store."""
    from medssl_jax.evaluate import linear_probe

    c = linear_probe.reference_config()
    c.init = export_dir
    c.seed = seed
    c.mesh = list(mesh)
    c.compute_dtype = compute_dtype
    for key in ("store", "cache_dir", "phantom_patients", "phantom_size", "phantom_seed"):
        c.data[key] = data_config[key]
    c.image_size = probe_config.image_size
    c.batch_size = probe_config.batch_size
    c.feature = probe_config.feature
    c.c_grid = tuple(probe_config.c_grid)
    c.splits.train = probe_config.train_split
    c.splits.test = probe_config.test_split
    c.splits.val = probe_config.val_split
    c.splits.val_fraction = probe_config.val_fraction
    c.label_fractions = (1.0,)
    return c


def random_baseline_model(model_config: dict) -> dict:
    """The export's architecture with its standard init: every residual branch active at initialisation.

    zero_init_last_bn is a training aid for pretraining (each block starts as the identity); for a random
    feature baseline it would switch every residual branch off.
    """
    model = dict(model_config)
    if "zero_init_last_bn" in model or model.get("name") == "resnet":
        model["zero_init_last_bn"] = False
    return model


def compare_with_baseline(workdir: str, baseline_workdir: str, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the two evaluation workdirs' test predictions (the code `compare` runs):
    {"mean_auc_diff", "ci95": [lo, hi], "p_value" (one-sided: share of resamples in which the first is not
    better), "num_resamples", "num_test_images"}."""
    from medssl_jax.evaluate import bootstrap, records

    runs = [records.read_eval(workdir), records.read_eval(baseline_workdir)]
    runs[0].name, runs[1].name = "pretrained", "random_init"
    _, labels, probs = records.align_runs(runs)
    boot = bootstrap.paired_bootstrap(probs=probs, labels=labels, label_names=runs[0].label_names,
                                      num_resamples=num_resamples, seed=seed, youden=False)
    diff = boot["comparisons"][0]["mean_auc"]
    return {"mean_auc_diff": diff["diff"]["point"], "ci95": [diff["diff"]["ci_low"], diff["diff"]["ci_high"]],
            "p_value": diff["p_a_not_better"], "num_resamples": int(num_resamples),
            "num_test_images": int(len(labels))}


def run_after_pretraining(export_dir: str, data_config, probe_config, *, mesh, seed: int, workdir: str,
                          compute_dtype: str = "float32") -> dict[str, Any]:
    """Probes the exported encoder (-> WORKDIR/eval/) and a fair random-init encoder of the same
    architecture (-> WORKDIR/baselines/random_init/eval/) on the same splits, both in the evaluation-workdir
    format that `python -m medssl_jax.compare` reads. WORKDIR/eval/summary.json also carries `random_init`
    (its AUCs and how it was built) and `vs_random_init` (paired bootstrap of the mean-AUC difference)."""
    from medssl_jax.evaluate import linear_probe

    config = probe_eval_config(export_dir, data_config, probe_config, mesh=mesh, seed=seed,
                               compute_dtype=compute_dtype)
    logging_lib.log(f"linear probe on {probe_config.feature} features of {export_dir}")
    summary = linear_probe.run(config, workdir)
    if not probe_config.random_baseline:
        return summary
    from medssl_jax import checkpoint

    baseline_dir = os.path.join(workdir, "baselines", "random_init")
    random_config = config.copy_and_resolve_references()
    random_config.init = "random"
    random_config.method = "none"
    random_config.name = "random_init"
    random_config.model = random_baseline_model(checkpoint.load_export_config(export_dir)["model"])
    random_config.splits.file = os.path.join(workdir, "splits.json")
    random_config.seed = seed + 1
    logging_lib.log("linear probe on a random-init encoder of the same architecture (the baseline)")
    baseline = linear_probe.run(random_config, baseline_dir)
    summary["random_init"] = {"mean_auc": baseline["mean_auc"], "per_label_auc": baseline["per_label_auc"],
                              "workdir": baseline_dir, "baseline": baseline["extra"].get("baseline")}
    summary["vs_random_init"] = compare_with_baseline(workdir, baseline_dir, seed=seed)
    path = os.path.join(workdir, "eval", "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)
    return summary
