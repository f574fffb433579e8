"""Multi-label classification metrics that match scikit-learn: per-label ROC-AUC, mean AUC, Youden metrics.

Point estimates come from scikit-learn itself (`roc_auc_score`, `roc_curve`), so the numbers in a report are
the numbers a reviewer gets by re-running sklearn on `predictions.npz`. `weighted_auc` (AUC only) and
`grouped_roc_stats` (AUC + Youden operating point) are the vectorised kernels the bootstrap uses: they
evaluate many multiplicity-weighted resamples at once and are tested to equal sklearn on the resampled
data, ties included. `label_mapping` aligns a model's labels with another store's for zero-shot evaluation.

Conventions:
- `labels` is float [N, L] with 1 = positive, 0 = negative, NaN = missing. A missing label excludes that
  image from that label only.
- A label whose (non-missing) test labels are all one class has no ROC curve: its AUC and Youden metrics are
  undefined (None in the result, null in JSON) and a note says why. The mean AUC is the unweighted mean over
  the defined labels (as `roc_auc_score(average=None).mean()` in the reference code).
- Youden threshold = argmax(TPR - FPR) over sklearn's `roc_curve` thresholds, the leading `inf` included; the
  first maximum wins (np.argmax). An image is called positive when its score >= threshold.
- Operating points are honest when their thresholds come from another split: `youden_thresholds` on the
  validation predictions, then `evaluate_predictions(..., thresholds=...)` scores the test split at them.
  The Youden point chosen on the evaluated split itself is optimistic and is reported as the *oracle*.
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


def operating_point(scores, y, threshold) -> dict:
    """Accuracy, sensitivity, specificity, F1 and confusion counts of `scores >= threshold`; NaN targets
    dropped; all NaN/None when the label has one class or no threshold is given."""
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y, np.float64)
    keep = ~np.isnan(y)
    scores, y = scores[keep], y[keep]
    if threshold is None or undefined_reason(y) is not None:
        return {"threshold": None, **{k: math.nan for k in YOUDEN_KEYS},
                "tp": None, "fp": None, "tn": None, "fn": None}
    pred = scores >= float(threshold)
    pos = y == 1
    tp, fp = int(np.sum(pred & pos)), int(np.sum(pred & ~pos))
    fn, tn = int(np.sum(~pred & pos)), int(np.sum(~pred & ~pos))
    return {"threshold": float(threshold), "accuracy": (tp + tn) / len(y), "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp), "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def youden_thresholds(probs, labels) -> list[float | None]:
    """Per-label Youden thresholds of predictions (e.g. on the validation split); None where undefined."""
    probs, labels, _ = check_predictions(probs, labels)
    return [youden_point(probs[:, j], labels[:, j])["threshold"] for j in range(probs.shape[1])]


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
    ties = len(ends) < len(s_sorted)
    w = np.take(weights, order, axis=1)
    yw = w * y_sorted
    tp = np.cumsum(yw, axis=1, dtype=np.float64)          # [B, G] positives with score >= s_g
    fp = np.cumsum(w, axis=1, dtype=np.float64)
    if ties:
        tp = tp[:, ends]
        fp = fp[:, ends]
    fp -= tp
    num_pos = tp[:, -1].copy()
    num_neg = fp[:, -1].copy()
    if ties:
        pos_g = np.diff(tp, axis=1, prepend=0.0)
        neg_g = np.diff(fp, axis=1, prepend=0.0)
    else:
        pos_g = yw
        neg_g = None
    defined = (num_pos > 0) & (num_neg > 0)
    p_safe = np.where(defined, num_pos, 1.0)
    n_safe = np.where(defined, num_neg, 1.0)
    # Each positive in group g beats the negatives below it and ties half of those in its group.
    numer = num_pos * num_neg - np.einsum("bg,bg->b", pos_g, fp, dtype=np.float64)
    if ties:
        numer += 0.5 * np.einsum("bg,bg->b", pos_g, neg_g)
    auc = numer / (p_safe * n_safe)
    # Youden exactly as argmax(tpr - fpr) over roc_curve's output (same float ops). Groups absent from a
    # resample repeat the previous point's J, so the first maximum is a present point. roc_curve also drops
    # "intermediate" points (step (dFP, dTP) equal to the next point's); such a point can only be the
    # maximum when its step mixes positives and negatives (a pure step strictly moves J by >= 1/N), i.e.
    # inside a tie group: those rare rows are redone with the exact rule in `_youden_exact`.
    j = tp / p_safe[:, None]
    j -= fp / n_safe[:, None]
    best = np.argmax(j, axis=1)
    rows = np.arange(len(w))
    if ties:
        mixed = (pos_g[rows, best] > 0) & (neg_g[rows, best] > 0) & defined
        for r in np.flatnonzero(mixed):
            best[r] = _youden_exact(j[r], pos_g[r], neg_g[r])
    j_best = j[rows, best]
    use_inf = ~(j_best > 0)          # roc_curve's leading inf point (J = 0) comes first and wins ties
    tp_b = np.where(use_inf, 0.0, tp[rows, best])
    fp_b = np.where(use_inf, 0.0, fp[rows, best])
    fn_b = num_pos - tp_b
    tn_b = num_neg - fp_b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "auc": auc,
            "accuracy": (tp_b + tn_b) / (num_pos + num_neg),
            "sensitivity": tp_b / num_pos,
            "specificity": tn_b / num_neg,
            "f1": 2 * tp_b / (2 * tp_b + fp_b + fn_b),
        }
    return {k: np.where(defined, v, np.nan) for k, v in out.items()}


def weighted_auc(scores, y, weights) -> np.ndarray:
    """ROC-AUC of one label for many multiplicity-weighted resamples: float64 [B], NaN if one class.

    The Mann-Whitney form: AUC = P(score_pos > score_neg) + 1/2 P(tie), over resampled pairs; equal to
    sklearn's trapezoidal AUC on the resampled data. Negatives are sorted once; per resample one cumulative
    sum over the negatives' multiplicities gives, for every positive, the weight of negatives scored above
    it (searchsorted positions, ties half). Cost O(n log n + B n).
    """
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y).astype(bool)
    weights = np.asarray(weights)
    if weights.ndim == 1:
        weights = weights[None]
    pos_idx = np.flatnonzero(y)
    neg_idx = np.flatnonzero(~y)
    neg_order = neg_idx[np.argsort(scores[neg_idx], kind="stable")]    # ascending scores
    neg_sorted = scores[neg_order]
    s_pos = scores[pos_idx]
    n_neg = len(neg_idx)
    # Cumulative negative weight from the top: C[:, k] = weight of the k highest-scored negatives.
    w_neg_desc = np.take(weights, neg_order[::-1], axis=1)
    c = np.zeros((len(weights), n_neg + 1), np.int64)
    np.cumsum(w_neg_desc, axis=1, out=c[:, 1:])
    above_strict = n_neg - np.searchsorted(neg_sorted, s_pos, side="right")   # negatives > s_p
    above_or_tie = n_neg - np.searchsorted(neg_sorted, s_pos, side="left")    # negatives >= s_p
    w_pos = np.take(weights, pos_idx, axis=1)
    num_pos = w_pos.sum(axis=1, dtype=np.float64)
    num_neg = c[:, -1].astype(np.float64)
    beaten_by = 0.5 * (np.einsum("bp,bp->b", w_pos, c[:, above_strict], dtype=np.float64)
                       + np.einsum("bp,bp->b", w_pos, c[:, above_or_tie], dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (num_pos * num_neg - beaten_by) / (num_pos * num_neg)
    return np.where((num_pos > 0) & (num_neg > 0), auc, np.nan)


def _youden_exact(j, pos_g, neg_g) -> int:
    """argmax of J over the points roc_curve keeps (drop_intermediate=True), one resample."""
    present = np.flatnonzero((pos_g + neg_g) > 0)
    steps_p, steps_n = pos_g[present], neg_g[present]
    keep = np.ones(len(present), bool)
    keep[1:-1] = (steps_p[1:-1] != steps_p[2:]) | (steps_n[1:-1] != steps_n[2:])
    kept = present[keep]
    return int(kept[np.argmax(j[kept])])


def label_mapping(model_label_names: Sequence[str], store_label_names: Sequence[str],
                  mapping: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shared label space for zero-shot evaluation on another store (distribution shift, Azizi).

    mapping: store label name -> model label name for names that differ (e.g. {"Effusion":
    "Pleural Effusion"}); other store labels match a model label of the same name or are dropped.
    Returns (model_columns, store_columns, names): probs[:, model_columns] and labels[:, store_columns]
    are then aligned, named by the model's labels.
    """
    model_label_names = [str(n) for n in model_label_names]
    store_label_names = [str(n) for n in store_label_names]
    mapping = dict(mapping or {})
    for store_name, model_name in mapping.items():
        if store_name not in store_label_names:
            raise MetricsError(f"label mapping: {store_name!r} is not a store label ({store_label_names})")
        if model_name not in model_label_names:
            raise MetricsError(f"label mapping: {model_name!r} is not a model label ({model_label_names})")
    model_cols, store_cols, names = [], [], []
    for j, store_name in enumerate(store_label_names):
        target = mapping.get(store_name, store_name)
        if target in model_label_names:
            if target in names:
                raise MetricsError(f"label mapping: model label {target!r} is mapped twice")
            model_cols.append(model_label_names.index(target))
            store_cols.append(j)
            names.append(target)
    if not names:
        raise MetricsError("label mapping: the model and the store share no label")
    return np.asarray(model_cols), np.asarray(store_cols), names


def json_number(x):
    """float for JSON: NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def not_one_hot_rows(labels) -> int:
    """How many rows of `labels` [N, L] are not one-hot (a NaN, a value other than 0/1, or not exactly one 1)."""
    labels = np.asarray(labels, np.float64)
    ok = ~np.isnan(labels).any(axis=1) & np.isin(labels, (0.0, 1.0)).all(axis=1) & (np.sum(labels == 1, axis=1) == 1)
    return int(np.sum(~ok))


def single_label_targets(labels) -> np.ndarray | None:
    """The class index of every row when `labels` [N, L] are one-hot (a multi-class task: no NaN, exactly
    one 1 per row); None for multi-label data."""
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2 or labels.shape[1] < 2 or not_one_hot_rows(labels):
        return None
    return np.argmax(labels, axis=1)


def top1_correct(probs, labels) -> np.ndarray | None:
    """[N] bool, argmax of the scores == the true class, for one-hot `labels`; None for multi-label data."""
    targets = single_label_targets(labels)
    return None if targets is None else np.argmax(np.asarray(probs), axis=1) == targets


def evaluate_predictions(*, probs, labels, label_names, thresholds: Sequence[float | None] | None = None) -> dict:
    """Per-label and mean metrics of multi-label predictions; the result is JSON-serialisable.

    probs: [N, L] scores (sigmoid probabilities); labels: [N, L] 0/1, NaN = missing; label_names: L names.
    thresholds: per-label decision thresholds chosen elsewhere (the validation split's Youden points, see
    `youden_thresholds`); the operating-point metrics are then measured at them. Without thresholds they
    are measured at this split's own Youden point, which is optimistic (`threshold_source` says which).
    For one-hot labels (a multi-class task) "top1_accuracy" is the fraction of rows whose highest score is
    the true class and "mean_auc" is the macro one-vs-rest AUC; otherwise "top1_accuracy" is None.
    Returns {"num_examples", "label_names", "mean_auc", "top1_accuracy", "num_defined_labels", "undefined_labels",
    "threshold_source" ('validation' | 'oracle'), "mean_youden": {accuracy, sensitivity, specificity, f1}
    (macro over defined labels), "mean_youden_oracle" (the same at this split's own Youden points),
    "per_label": {name: {auc, n, n_pos, n_neg, n_missing, threshold, accuracy, sensitivity, specificity,
    f1, tp, fp, tn, fn, oracle: {threshold, accuracy, ...}, note}}, "notes": [...]}. Undefined numbers are
    None.
    """
    probs, labels, label_names = check_predictions(probs, labels, label_names)
    if thresholds is not None and len(thresholds) != len(label_names):
        raise MetricsError(f"thresholds: {len(thresholds)} values for {len(label_names)} labels")
    per_label = {}
    notes = []
    aucs = []
    youdens = {k: [] for k in YOUDEN_KEYS}
    oracles = {k: [] for k in YOUDEN_KEYS}
    for j, name in enumerate(label_names):
        y = labels[:, j]
        keep = ~np.isnan(y)
        reason = undefined_reason(y[keep])
        auc = roc_auc(probs[:, j], y)
        oracle = youden_point(probs[:, j], y)
        point = oracle if thresholds is None else operating_point(probs[:, j], y, thresholds[j])
        entry = {
            "auc": json_number(auc),
            "n": int(keep.sum()),
            "n_pos": int(np.sum(y[keep] == 1)),
            "n_neg": int(np.sum(y[keep] == 0)),
            "n_missing": int((~keep).sum()),
            "threshold": json_number(point["threshold"]),
            **{k: json_number(point[k]) for k in YOUDEN_KEYS},
            **{k: point[k] for k in ("tp", "fp", "tn", "fn")},
            "oracle": {"threshold": json_number(oracle["threshold"]), **{k: json_number(oracle[k]) for k in YOUDEN_KEYS}},
            "note": reason,
        }
        per_label[name] = entry
        if reason is not None:
            notes.append(f"{name}: {reason}; excluded from the mean")
        else:
            aucs.append(auc)
            for k in YOUDEN_KEYS:
                if math.isfinite(point[k]):
                    youdens[k].append(point[k])
                oracles[k].append(oracle[k])
    correct = top1_correct(probs, labels)
    if thresholds is not None:
        missing = [n for n, t in zip(label_names, thresholds) if t is None and per_label[n]["auc"] is not None]
        if missing:
            notes.append(f"no validation threshold for {missing} (one class in validation): no operating point")
    return {
        "num_examples": int(probs.shape[0]),
        "label_names": list(label_names),
        "mean_auc": json_number(np.mean(aucs)) if aucs else None,
        "top1_accuracy": None if correct is None else json_number(np.mean(correct)),
        "num_defined_labels": len(aucs),
        "undefined_labels": [n for n in label_names if per_label[n]["auc"] is None],
        "threshold_source": "oracle" if thresholds is None else "validation",
        "mean_youden": {k: (json_number(np.mean(v)) if v else None) for k, v in youdens.items()},
        "mean_youden_oracle": {k: (json_number(np.mean(v)) if v else None) for k, v in oracles.items()},
        "per_label": per_label,
        "notes": notes,
    }


def fmt_auc(value) -> str:
    """An AUC for a log line: 4 decimals, 'n/a' when undefined (a label without both classes)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"
