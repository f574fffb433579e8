"""Multi-label classification metrics that match scikit-learn: per-label ROC-AUC, mean AUC, Youden metrics.

Point estimates come from scikit-learn itself (`roc_auc_score`, `roc_curve`), so the numbers in a report are
the numbers a reviewer gets by re-running sklearn on `predictions.npz`. `grouped_roc_stats` is the vectorised
kernel the bootstrap uses: it evaluates AUC and the Youden operating point for many multiplicity-weighted
resamples at once, and is tested to equal sklearn on the resampled data, ties included.

Conventions:
- `labels` is float [N, L] with 1 = positive, 0 = negative, NaN = missing. A missing label excludes that
  image from that label only.
- A label whose (non-missing) test labels are all one class has no ROC curve: its AUC and Youden metrics are
  undefined (None in the result, null in JSON) and a note says why. The mean AUC is the unweighted mean over
  the defined labels (as `roc_auc_score(average=None).mean()` in the reference code).
- Youden threshold = argmax(TPR - FPR) over sklearn's `roc_curve` thresholds, the leading `inf` included; the
  first maximum wins (np.argmax). An image is called positive when its score >= threshold.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

YOUDEN_KEYS = ("accuracy", "sensitivity", "specificity", "f1")


class MetricsError(ValueError):
    """Bad input to a metric function (one-line message naming the input)."""


def check_predictions(probs, labels, label_names: Sequence[str] | None = None):
    """Validates and returns (probs float64 [N, L], labels float64 [N, L], label_names list[str])."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim == 1:
        probs = probs[:, None]
    if labels.ndim == 1:
        labels = labels[:, None]
    if probs.ndim != 2:
        raise MetricsError(f"probs: expected shape [N, L], got {probs.shape}")
    if labels.shape != probs.shape:
        raise MetricsError(f"labels: shape {labels.shape} does not match probs shape {probs.shape}")
    if probs.shape[0] == 0:
        raise MetricsError("probs: no examples (N = 0)")
    if not np.issubdtype(probs.dtype, np.number) or not np.issubdtype(labels.dtype, np.number):
        raise MetricsError(f"probs/labels: expected numeric arrays, got {probs.dtype} and {labels.dtype}")
    probs = probs.astype(np.float64)
    labels = labels.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        bad = np.argwhere(~np.isfinite(probs))[0]
        raise MetricsError(f"probs: non-finite value at [example {bad[0]}, label {bad[1]}]")
    known = labels[~np.isnan(labels)]
    if known.size and not np.all((known == 0) | (known == 1)):
        raise MetricsError(f"labels: values must be 0, 1 or NaN (missing), found {np.unique(known)[:5]}")
    num_labels = probs.shape[1]
    if label_names is None:
        label_names = [f"label_{i}" for i in range(num_labels)]
    label_names = [str(n) for n in label_names]
    if len(label_names) != num_labels:
        raise MetricsError(f"label_names: {len(label_names)} names for {num_labels} label columns")
    if len(set(label_names)) != len(label_names):
        raise MetricsError(f"label_names: duplicate names in {label_names}")
    return probs, labels, label_names


def undefined_reason(y) -> str | None:
    """Why a label's AUC is undefined on targets `y` (NaN already removed), or None if it is defined."""
    n_pos = int(np.sum(y == 1))
    n_neg = int(np.sum(y == 0))
    if n_pos == 0 and n_neg == 0:
        return "undefined: every label is missing"
    if n_pos == 0:
        return f"undefined: no positives among {n_neg} labelled examples"
    if n_neg == 0:
        return f"undefined: no negatives among {n_pos} labelled examples"
    return None


def roc_auc(scores, y) -> float:
    """sklearn ROC-AUC of one label (NaN targets dropped); NaN when only one class is present."""
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y, np.float64)
    keep = ~np.isnan(y)
    scores, y = scores[keep], y[keep]
    if undefined_reason(y) is not None:
        return math.nan
    return float(skm.roc_auc_score(y, scores))


def youden_point(scores, y) -> dict:
    """Youden operating point of one label via sklearn's roc_curve; NaN targets dropped.

    Returns threshold, accuracy, sensitivity, specificity, f1 and the confusion counts; all NaN/None when the
    label has one class only.
    """
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y, np.float64)
    keep = ~np.isnan(y)
    scores, y = scores[keep], y[keep]
    if undefined_reason(y) is not None:
        return {"threshold": None, **{k: math.nan for k in YOUDEN_KEYS},
                "tp": None, "fp": None, "tn": None, "fn": None}
    fpr, tpr, thresholds = skm.roc_curve(y, scores)
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    pred = scores >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    return {
        "threshold": threshold,
        "accuracy": (tp + tn) / len(y),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def per_label_auc(probs, labels) -> np.ndarray:
    """sklearn ROC-AUC per label column, NaN where undefined. probs/labels [N, L], labels NaN = missing."""
    probs, labels, _ = check_predictions(probs, labels)
    return np.array([roc_auc(probs[:, j], labels[:, j]) for j in range(probs.shape[1])])


def grouped_roc_stats(scores, y, weights) -> dict:
    """AUC and Youden metrics of one label for many multiplicity-weighted resamples at once.

    scores: float [n]; y: bool/0-1 [n] (no missing); weights: [B, n] non-negative multiplicities (a bootstrap
    resample is the vector of how often each image was drawn). Weighted statistics equal sklearn's
    unweighted ones on the resampled data: duplicates of an image are ties with each other, and ties between
    a positive and a negative count 1/2 (the Mann-Whitney form of the trapezoidal AUC).

    Scores are sorted once (descending, like roc_curve), tied scores grouped; per resample the cumulative
    positive/negative weights at each distinct score give TP/FP at every threshold, so the cost is
    O(n log n + B n). Returns dict of float64 [B] arrays: auc, accuracy, sensitivity, specificity, f1
    (NaN where a resample has only one class).
    """
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y).astype(bool)
    weights = np.asarray(weights)
    if weights.ndim == 1:
        weights = weights[None]
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    y_sorted = y[order]
    # Last index of each run of equal scores: the threshold "score >= s_g" includes the whole tie group.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    w = weights[:, order].astype(np.float64)
    tp = np.cumsum(w * y_sorted, axis=1)[:, ends]            # [B, G] positives with score >= s_g
    fp = np.cumsum(w * ~y_sorted, axis=1)[:, ends]
    num_pos = tp[:, -1]
    num_neg = fp[:, -1]
    pos_g = np.diff(tp, axis=1, prepend=0.0)
    neg_g = np.diff(fp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Each positive in group g beats the negatives below it and ties half of those in its group.
        auc = np.sum(pos_g * (num_neg[:, None] - fp + 0.5 * neg_g), axis=1) / (num_pos * num_neg)
        tpr = tp / num_pos[:, None]
        fpr = fp / num_neg[:, None]
    # Column 0 is roc_curve's leading inf threshold (nothing called positive, J = 0).
    j = np.concatenate([np.zeros((len(w), 1)), tpr - fpr], axis=1)
    best = np.argmax(np.nan_to_num(j, nan=-np.inf), axis=1)
    pad = lambda a: np.concatenate([np.zeros((len(w), 1)), a], axis=1)  # noqa: E731
    tp_b = np.take_along_axis(pad(tp), best[:, None], axis=1)[:, 0]
    fp_b = np.take_along_axis(pad(fp), best[:, None], axis=1)[:, 0]
    fn_b = num_pos - tp_b
    tn_b = num_neg - fp_b
    defined = (num_pos > 0) & (num_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "auc": auc,
            "accuracy": (tp_b + tn_b) / (num_pos + num_neg),
            "sensitivity": tp_b / num_pos,
            "specificity": tn_b / num_neg,
            "f1": 2 * tp_b / (2 * tp_b + fp_b + fn_b),
        }
    return {k: np.where(defined, v, np.nan) for k, v in out.items()}


def _num(x):
    """float for JSON: NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_predictions(*, probs, labels, label_names) -> dict:
    """Per-label and mean metrics of multi-label predictions; the result is JSON-serialisable.

    probs: [N, L] scores (sigmoid probabilities); labels: [N, L] 0/1, NaN = missing; label_names: L names.
    Returns {"num_examples", "label_names", "mean_auc", "num_defined_labels", "undefined_labels",
    "mean_youden": {accuracy, sensitivity, specificity, f1} (macro over defined labels),
    "per_label": {name: {auc, n, n_pos, n_neg, n_missing, threshold, accuracy, sensitivity, specificity,
    f1, tp, fp, tn, fn, note}}, "notes": [...]}. Undefined numbers are None.
    """
    probs, labels, label_names = check_predictions(probs, labels, label_names)
    per_label = {}
    notes = []
    aucs = []
    youdens = {k: [] for k in YOUDEN_KEYS}
    for j, name in enumerate(label_names):
        y = labels[:, j]
        keep = ~np.isnan(y)
        reason = undefined_reason(y[keep])
        auc = roc_auc(probs[:, j], y)
        yp = youden_point(probs[:, j], y)
        entry = {
            "auc": _num(auc),
            "n": int(keep.sum()),
            "n_pos": int(np.sum(y[keep] == 1)),
            "n_neg": int(np.sum(y[keep] == 0)),
            "n_missing": int((~keep).sum()),
            "threshold": _num(yp["threshold"]),
            **{k: _num(yp[k]) for k in YOUDEN_KEYS},
            **{k: yp[k] for k in ("tp", "fp", "tn", "fn")},
            "note": reason,
        }
        per_label[name] = entry
        if reason is not None:
            notes.append(f"{name}: {reason}; excluded from the mean")
        else:
            aucs.append(auc)
            for k in YOUDEN_KEYS:
                youdens[k].append(yp[k])
    return {
        "num_examples": int(probs.shape[0]),
        "label_names": list(label_names),
        "mean_auc": _num(np.mean(aucs)) if aucs else None,
        "num_defined_labels": len(aucs),
        "undefined_labels": [n for n in label_names if per_label[n]["auc"] is None],
        "mean_youden": {k: (_num(np.mean(v)) if v else None) for k, v in youdens.items()},
        "per_label": per_label,
        "notes": notes,
    }
