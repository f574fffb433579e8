"""The linear probe's fitter: multi-label logistic regression on frozen encoder features.

One L2-regularised logistic regression per label (scikit-learn) on standardised features of the train
patients; the regularisation C is chosen on the validation patients (never on test). A record with a
missing label is left out for that label only. The linear_probe mode (evaluate/linear_probe.py) runs it;
its C grid is also the default of the end-of-pretraining probe's config (config_lib.linear_probe_fields).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.special
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from medssl_jax.evaluate import metrics


# Inverse L2 strengths tried on the validation patients; wide on purpose (random features often want the
# weakest regularisation); a choice at either end is logged as a warning.
C_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)


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

    def as_dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel [D, L], bias [L]) of a Dense layer on raw features with the same logits (LP-FT's head):
        ((x - mean) / std) @ w + b = x @ (w / std) + (b - (mean / std) @ w)."""
        kernel = self.w / self.std[:, None]
        bias = self.b - (self.mean / self.std) @ self.w
        return kernel.astype(np.float32), bias.astype(np.float32)


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


def check_c_choice(best_c: float, c_grid) -> str | None:
    """A warning when the chosen C sits at an end of the grid (the best value may lie outside it)."""
    grid = sorted(float(c) for c in c_grid)
    if len(grid) > 1 and best_c in (grid[0], grid[-1]):
        side = "largest (weakest regularisation)" if best_c == grid[-1] else "smallest (strongest regularisation)"
        return (f"warning: the chosen C={best_c:g} is the {side} value of config.c_grid {tuple(grid)}; "
                "widen the grid")
    return None
