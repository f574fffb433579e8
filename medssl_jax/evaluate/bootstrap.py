"""Paired bootstrap over test images: CIs, one-sided p-values, Benjamini-Hochberg across labels.

Protocol (Tayebi Arasteh et al. 2024 code, made deterministic):
- B resamples (default 1000) of the N test indices with replacement, each of size N, drawn once from
  `np.random.default_rng(seed)`; the SAME [B, N] index matrix is used for every model (paired bootstrap).
- Per replicate and label: ROC-AUC and an operating point -> accuracy, sensitivity, specificity, F1. When a
  model comes with decision thresholds chosen on the validation split (`thresholds`), the operating point is
  that fixed threshold (the honest figure); otherwise it is the Youden point recomputed on each replicate, as
  in the paper's code, which is chosen on the test images themselves (an oracle, labelled so). Computed for all replicates at once: a resample is a vector of
  multiplicities, and `metrics.grouped_roc_stats` evaluates weighted statistics equal to sklearn's on the
  resampled data (O(N log N + B N) per label and model).
- A missing label (NaN) removes that image from that label only. A replicate in which a label has only one
  class is NaN for that label and excluded from that label's CI and p-values; the replicate's mean AUC is the
  mean over the labels defined in that replicate (the count of such replicates is reported).
- CIs: percentile intervals of the valid replicates. Point estimates: sklearn on the full test set.
- p-values: p(A not better than B) = fraction of valid replicates with AUC_A <= AUC_B (the paper's p1), and
  the other direction p(B not better than A). p = 0 means no replicate favoured the other model; report it
  as p < 1/B.
- Benjamini-Hochberg (scipy.stats.false_discovery_control) is applied to the vector of per-label p-values
  of each comparison and direction (the paper's code applied it to one p at a time, a no-op). The mean-AUC
  p-value is a separate test and is not in the BH family.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

from medssl_jax.evaluate import metrics

STAT_KEYS = ("auc",) + metrics.YOUDEN_KEYS


class BootstrapError(ValueError):
    """Bad input to the bootstrap (one-line message naming the input)."""


def bootstrap_indices(num_examples: int, *, num_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[num_resamples, num_examples] int64 indices drawn with replacement; deterministic in `seed`."""
    if num_examples < 1:
        raise BootstrapError(f"num_examples: must be >= 1, got {num_examples}")
    if num_resamples < 1:
        raise BootstrapError(f"num_resamples: must be >= 1, got {num_resamples}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_examples, size=(num_resamples, num_examples), dtype=np.int64)


def resample_counts(indices: np.ndarray, num_examples: int) -> np.ndarray:
    """[B, N] multiplicity of each example in each resample (row b = bincount(indices[b]))."""
    b = len(indices)
    flat = (indices + np.arange(b, dtype=np.int64)[:, None] * num_examples).ravel()
    return np.bincount(flat, minlength=b * num_examples).reshape(b, num_examples).astype(np.int32)


def replicate_stats(probs_by_model: Mapping[str, np.ndarray], labels: np.ndarray, indices: np.ndarray,
                    *, youden: bool = True, num_threads: int | None = None,
                    max_chunk_elements: int = 2_000_000,
                    thresholds: Mapping[str, Sequence[float | None]] | None = None) -> dict:
    """Per-replicate statistics for each model on shared resamples.

    probs_by_model: name -> [N, L]; labels [N, L] (NaN missing); indices [B, N].
    Returns name -> {"auc" (and with youden=True "accuracy"|"sensitivity"|"specificity"|"f1"):
    [B, L] float64 (NaN where the replicate has one class), "mean_<stat>": [B]}.
    A model named in `thresholds` (name -> per-label threshold, None = none) has its operating-point
    statistics measured at those fixed thresholds instead of each replicate's own Youden point.
    AUC alone costs O(B N) per label and model; the Youden statistics about 6x that. Labels run in
    `num_threads` threads (numpy releases the GIL in the heavy loops); default min(4, cpu count).
    """
    labels = np.asarray(labels, np.float64)
    n, num_labels = labels.shape
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] != n:
        raise BootstrapError(f"indices: expected shape [B, {n}], got {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise BootstrapError(f"indices: values must lie in [0, {n})")
    keys = STAT_KEYS if youden else ("auc",)
    num_resamples = len(indices)
    out = {name: {k: np.full((num_resamples, num_labels), np.nan) for k in keys}
           for name in probs_by_model}
    valid = ~np.isnan(labels)
    chunk = max(1, max_chunk_elements // n)
    threads = num_threads or min(4, os.cpu_count() or 1)

    def one_label(j, start, counts):
        keep = valid[:, j]
        if not keep.any():
            return
        w = counts if keep.all() else counts[:, keep]
        y = labels[keep, j] == 1
        for name, probs in probs_by_model.items():
            if youden:
                stats = metrics.grouped_roc_stats(probs[keep, j], y, w)
                if thresholds and name in thresholds:
                    stats.update(fixed_threshold_stats(probs[keep, j], y, w, thresholds[name][j]))
            else:
                stats = {"auc": metrics.weighted_auc(probs[keep, j], y, w)}
            for k in keys:
                out[name][k][start:start + len(counts), j] = stats[k]

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, num_resamples, chunk):
            counts = resample_counts(indices[start:start + chunk], n)
            # list() re-raises the first worker exception here.
            list(pool.map(lambda j: one_label(j, start, counts), range(num_labels)))
    for res in out.values():
        for k in keys:
            res[f"mean_{k}"] = _row_nanmean(res[k])
    return out


def fixed_threshold_stats(scores, y, weights, threshold) -> dict:
    """Accuracy, sensitivity, specificity, F1 of `scores >= threshold` for multiplicity-weighted resamples
    [B, n] (NaN where a resample has one class, or everywhere when threshold is None)."""
    w = np.asarray(weights, np.float64)
    if w.ndim == 1:
        w = w[None]
    if threshold is None or not math.isfinite(float(threshold)):
        return {k: np.full(len(w), np.nan) for k in metrics.YOUDEN_KEYS}
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores, np.float64) >= float(threshold)
    tp, fp = w @ (pred & y), w @ (pred & ~y)
    fn, tn = w @ (~pred & y), w @ (~pred & ~y)
    pos, neg = tp + fn, fp + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": (tp + tn) / (pos + neg), "sensitivity": tp / pos, "specificity": tn / neg,
               "f1": 2 * tp / (2 * tp + fp + fn)}
    defined = (pos > 0) & (neg > 0)
    return {k: np.where(defined, v, np.nan) for k, v in out.items()}


def _row_nanmean(a: np.ndarray) -> np.ndarray:
    count = np.sum(~np.isnan(a), axis=1)
    total = np.nansum(a, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _f(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(replicates: np.ndarray, point, *, confidence: float = 0.95) -> dict:
    """Point estimate + percentile CI, mean and std of the valid (non-NaN) replicates."""
    r = np.asarray(replicates, np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return {"point": _f(point), "ci_low": None, "ci_high": None, "mean": None, "std": None,
                "num_valid": 0}
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return {"point": _f(point), "ci_low": _f(lo), "ci_high": _f(hi), "mean": _f(r.mean()),
            "std": _f(r.std()), "num_valid": int(r.size)}


def one_sided_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fraction of replicates (both defined) where a <= b: p-value that A is NOT better than B."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        return None
    return float(np.mean(a[ok] <= b[ok]))


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float | None]:
    """BH-adjusted p-values of a vector; None/NaN entries stay None and are not counted in the family."""
    p = np.array([np.nan if v is None else v for v in pvalues], np.float64)
    ok = ~np.isnan(p)
    adj = np.full(p.shape, np.nan)
    if ok.any():
        adj[ok] = scipy.stats.false_discovery_control(p[ok], method="bh")
    return [_f(v) for v in adj]


def paired_bootstrap(*, probs: Mapping[str, np.ndarray], labels, label_names: Sequence[str],
                     num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     youden: bool = True, num_threads: int | None = None,
                     thresholds: Mapping[str, Sequence[float | None]] | None = None) -> dict:
    """Bootstrap CIs per model and paired comparisons between every pair of models (JSON-serialisable).

    probs: model name -> [N, L] scores, all on the same test images in the same order as `labels` [N, L].
    Returns {"num_resamples", "seed", "confidence", "num_examples", "label_names", "notes",
    "models": {name: {"metrics": evaluate_predictions(...), "mean_auc": summary, "mean_youden": {k: summary},
                      "per_label": {label: {stat: summary}}}},
    "comparisons": [{"a", "b", "mean_auc": {"diff": summary, "p_a_not_better", "p_b_not_better"},
                     "per_label": {label: {"diff": summary, "p_a_not_better", "p_b_not_better",
                                           "p_a_not_better_bh", "p_b_not_better_bh"}}}]}
    where summary = {"point", "ci_low", "ci_high", "mean", "std", "num_valid"}. With youden=False only AUC
    is resampled (Youden summaries then carry the point estimate and no CI). `thresholds` (model name ->
    per-label validation thresholds) fixes those models' operating points; each model's
    "threshold_source" says 'validation' or 'oracle'.
    """
    if not probs:
        raise BootstrapError("probs: no models given")
    checked = {}
    for name, p in probs.items():
        try:
            p2, labels2, names = metrics.check_predictions(p, labels, label_names)
        except metrics.MetricsError as e:
            raise BootstrapError(f"model {name!r}: {e}") from None
        checked[name] = p2
    labels, label_names = labels2, names
    n = labels.shape[0]
    indices = bootstrap_indices(n, num_resamples=num_resamples, seed=seed)
    thresholds = {k: list(v) for k, v in (thresholds or {}).items() if v is not None}
    reps = replicate_stats(checked, labels, indices, youden=youden, num_threads=num_threads,
                           thresholds=thresholds)
    missing = np.full((num_resamples, len(label_names)), np.nan)

    notes = []
    models = {}
    for name, p in checked.items():
        point = metrics.evaluate_predictions(probs=p, labels=labels, label_names=label_names,
                                             thresholds=thresholds.get(name))
        per_label = {}
        for j, lname in enumerate(label_names):
            pl = point["per_label"][lname]
            per_label[lname] = {k: summarize(reps[name].get(k, missing)[:, j], pl[k], confidence=confidence)
                                for k in STAT_KEYS}
        models[name] = {
            "threshold_source": point["threshold_source"],
            "metrics": point,
            "mean_auc": summarize(reps[name]["mean_auc"], point["mean_auc"], confidence=confidence),
            "mean_youden": {k: summarize(reps[name].get(f"mean_{k}", missing[:, 0]), point["mean_youden"][k],
                                         confidence=confidence) for k in metrics.YOUDEN_KEYS},
            "per_label": per_label,
        }
    first = next(iter(checked))
    defined = ~np.all(np.isnan(reps[first]["auc"]), axis=0)
    partial = np.any(np.isnan(reps[first]["auc"][:, defined]), axis=1)
    for j, lname in enumerate(label_names):
        num_nan = int(np.isnan(reps[first]["auc"][:, j]).sum())
        if 0 < num_nan:
            what = "all" if num_nan == num_resamples else f"{num_nan} of {num_resamples}"
            notes.append(f"{lname}: {what} replicates have one class only; excluded for this label")
    if partial.any():
        notes.append(f"{int(partial.sum())} replicates lack some label's two classes; their mean AUC is "
                     "the mean over the labels defined in the replicate")

    # Multi-class test sets (one-hot labels) also get top-1 accuracy, resampled on the same indices.
    top1 = {}
    for name, p in checked.items():
        correct = metrics.top1_correct(p, labels)
        if correct is None:  # the labels are shared: multi-label for one model means for all
            break
        top1[name] = correct[indices].mean(axis=1)
        models[name]["top1_accuracy"] = summarize(top1[name], float(np.mean(correct)), confidence=confidence)

    names = list(checked)
    comparisons = []
    for ia in range(len(names)):
        for ib in range(ia + 1, len(names)):
            a, b = names[ia], names[ib]
            ra, rb = reps[a], reps[b]
            per_label = {}
            pa, pb = [], []
            for j, lname in enumerate(label_names):
                pt_a = models[a]["metrics"]["per_label"][lname]["auc"]
                pt_b = models[b]["metrics"]["per_label"][lname]["auc"]
                diff_pt = None if pt_a is None or pt_b is None else pt_a - pt_b
                p1 = one_sided_p(ra["auc"][:, j], rb["auc"][:, j])
                p2 = one_sided_p(rb["auc"][:, j], ra["auc"][:, j])
                pa.append(p1)
                pb.append(p2)
                per_label[lname] = {"diff": summarize(ra["auc"][:, j] - rb["auc"][:, j], diff_pt,
                                                      confidence=confidence),
                                    "p_a_not_better": p1, "p_b_not_better": p2}
            for lname, q1, q2 in zip(label_names, benjamini_hochberg(pa), benjamini_hochberg(pb)):
                per_label[lname]["p_a_not_better_bh"] = q1
                per_label[lname]["p_b_not_better_bh"] = q2
            ma, mb = models[a]["mean_auc"]["point"], models[b]["mean_auc"]["point"]
            comparisons.append({
                "a": a, "b": b,
                "mean_auc": {
                    "diff": summarize(ra["mean_auc"] - rb["mean_auc"],
                                      None if ma is None or mb is None else ma - mb, confidence=confidence),
                    "p_a_not_better": one_sided_p(ra["mean_auc"], rb["mean_auc"]),
                    "p_b_not_better": one_sided_p(rb["mean_auc"], ra["mean_auc"]),
                },
                "per_label": per_label,
            })
            if top1:
                ta, tb = models[a]["top1_accuracy"]["point"], models[b]["top1_accuracy"]["point"]
                comparisons[-1]["top1_accuracy"] = {
                    "diff": summarize(top1[a] - top1[b], ta - tb, confidence=confidence),
                    "p_a_not_better": one_sided_p(top1[a], top1[b]),
                    "p_b_not_better": one_sided_p(top1[b], top1[a]),
                }
    return {"num_resamples": int(num_resamples), "seed": int(seed), "confidence": float(confidence),
            "youden_resampled": bool(youden),
            "num_examples": int(n), "label_names": list(label_names), "notes": notes,
            "models": models, "comparisons": comparisons}


def verdict(p_a: float | None, p_b: float | None, a: str, b: str, alpha: float = 0.05) -> str:
    """'A better' / 'B better' / 'n.s.' from the two one-sided p-values (A not better, B not better)."""
    if p_a is None or p_b is None:
        return "n/a"
    if p_a <= alpha:
        return f"{a} better"
    if p_b <= alpha:
        return f"{b} better"
    return "n.s."


def format_p(p: float | None, num_resamples: int) -> str:
    """'p < 0.001' style text for a bootstrap p-value (0 means below the resolution 1/B)."""
    if p is None:
        return "n/a"
    if p == 0:
        return f"< {1 / num_resamples:.3g}"
    return f"{p:.3g}"


def bench_bootstrap(*, num_examples: int = 10_000, num_labels: int = 14, num_models: int = 2,
                    num_resamples: int = 1000, seed: int = 0, num_threads: int | None = None) -> dict:
    """Times the paired bootstrap on synthetic continuous predictions with 5% missing labels.

    Returns wall-clock seconds of `paired_bootstrap` with AUC only ("auc_seconds") and with the Youden
    statistics resampled too ("youden_seconds"), plus the CPU seconds of each (all threads; on a shared
    machine the CPU time is the more stable number). Both include the index draw, sklearn point estimates
    and all summaries.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random((num_examples, num_labels)) < 0.1).astype(np.float64)
    labels[rng.random(labels.shape) < 0.05] = np.nan
    probs = {f"m{i}": rng.random((num_examples, num_labels)) * 0.8 + 0.2 * np.nan_to_num(labels)
             for i in range(num_models)}
    names = [f"l{j}" for j in range(num_labels)]
    result = {"num_examples": num_examples, "num_labels": num_labels, "num_models": num_models,
              "num_resamples": num_resamples, "num_threads": num_threads or min(4, os.cpu_count() or 1)}
    for key, youden in (("auc", False), ("youden", True)):
        t0, c0 = time.perf_counter(), time.process_time()
        paired_bootstrap(probs=probs, labels=labels, label_names=names, num_resamples=num_resamples,
                         seed=seed, youden=youden, num_threads=num_threads)
        result[f"{key}_seconds"] = round(time.perf_counter() - t0, 3)
        result[f"{key}_cpu_seconds"] = round(time.process_time() - c0, 3)
    return result


if __name__ == "__main__":
    print(bench_bootstrap())


def per_seed_aucs(probs: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[S, B, L] AUC of each seed's predictions (probs [S, N, L]) on each resample (counts [B, N]) and label;
    NaN where a label has one class in a resample (the same replicates for every seed: it depends on the
    labels and counts only)."""
    labels = np.asarray(labels, np.float64)
    aucs = np.full((len(probs), len(counts), labels.shape[1]), np.nan)
    for j in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, j])
        if keep.any():
            for s, p in enumerate(probs):
                aucs[s, :, j] = metrics.weighted_auc(np.asarray(p)[keep, j], labels[keep, j] == 1, counts[:, keep])
    return aucs


def _seed_mean_replicates(aucs: np.ndarray, seed_draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From per_seed_aucs' [S, B, L] and seed_draws [B, k] (the seeds drawn for each replicate): ([B] the mean
    over the drawn seeds of each seed's mean-over-labels AUC, a label with one class in a replicate left out
    of that mean; [B, L] the mean over the drawn seeds of each label's AUC)."""
    per_seed = np.stack([_row_nanmean(a) for a in aucs])  # [S, B]
    mean = np.take_along_axis(per_seed.T, seed_draws, axis=1).mean(axis=1)
    per_label = np.take_along_axis(aucs.transpose(1, 0, 2), seed_draws[:, :, None], axis=1).mean(axis=1)
    return mean, per_label


def seed_draws(num_seeds: int, *, num_resamples: int, seed: int, stream: int) -> np.ndarray:
    """[B, num_seeds] seed indices drawn with replacement, from np.random.default_rng([seed, stream])."""
    return np.random.default_rng([seed, stream]).integers(0, num_seeds, size=(num_resamples, num_seeds))


def seed_and_image_bootstrap(*, probs_a: np.ndarray, probs_b: np.ndarray | None = None, labels,
                             num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean AUC of arm A (and its difference from arm B) with an interval that covers both the test sample
    and the seed-to-seed variation of training, over all labels and per label.

    probs_a [S_a, N, L], probs_b [S_b, N, L]: each seed's test predictions on the same N images. Replicate b
    resamples the N test images with replacement (`bootstrap_indices(N, seed=seed)`, the same images for
    both arms: paired) and each arm's seeds with replacement (`seed_draws`, streams 1 for A and 2 for B),
    and takes each arm's mean over its drawn seeds of the per-seed mean AUC on those images. The point
    estimate is the mean over seeds of the per-seed mean AUC on all images; CIs are percentiles of the
    replicates; p_a_not_better is the share of replicates in which A's mean AUC <= B's (one-sided).
    With one seed per arm this is the paired image bootstrap.
    "per_label" holds the same for each label column on the same replicates (image and seed draws), with
    Benjamini-Hochberg over the labels of each direction's p-value (`p_a_not_better_bh`): the per-label
    comparison of Tayebi Arasteh et al. with seed noise included.
    Returns {"a": summary, "b": summary, "diff": summary, "p_a_not_better", "p_b_not_better",
    "num_resamples", "num_seeds": [S_a, S_b], "per_label": [{"a", "b", "diff", "p_a_not_better",
    "p_b_not_better", "p_a_not_better_bh", "p_b_not_better_bh"} per label]} (the B entries only with probs_b)."""
    probs_a = np.asarray(probs_a, np.float64)
    labels = np.asarray(labels, np.float64)
    if probs_a.ndim != 3 or probs_a.shape[1:] != labels.shape:
        raise BootstrapError(f"probs_a: expected [seeds, {labels.shape[0]}, {labels.shape[1]}], got {probs_a.shape}")
    if probs_b is not None:
        probs_b = np.asarray(probs_b, np.float64)
        if probs_b.ndim != 3 or probs_b.shape[1:] != labels.shape:
            raise BootstrapError(f"probs_b: expected [seeds, {labels.shape[0]}, {labels.shape[1]}], "
                                 f"got {probs_b.shape}")
    n = labels.shape[0]
    counts = resample_counts(bootstrap_indices(n, num_resamples=num_resamples, seed=seed), n)
    ones = np.ones((1, n), np.int32)

    def arm(probs, stream):
        """(replicates [B], per-label replicates [B, L], point, per-label points [L]) of one arm."""
        rep, rep_label = _seed_mean_replicates(
            per_seed_aucs(probs, labels, counts),
            seed_draws(len(probs), num_resamples=num_resamples, seed=seed, stream=stream))
        full = per_seed_aucs(probs, labels, ones)[:, 0]  # [S, L] each seed on all images
        per_seed_mean = _row_nanmean(full)
        point = None if np.all(np.isnan(per_seed_mean)) else float(np.nanmean(per_seed_mean))
        return rep, rep_label, point, full.mean(axis=0)

    rep_a, lab_a, pa, lpa = arm(probs_a, 1)
    out = {"num_resamples": int(num_resamples), "num_seeds": [len(probs_a)],
           "a": summarize(rep_a, pa, confidence=confidence),
           "per_label": [{"a": summarize(lab_a[:, j], lpa[j], confidence=confidence)} for j in range(labels.shape[1])]}
    if probs_b is None:
        return out
    rep_b, lab_b, pb, lpb = arm(probs_b, 2)
    out.update({"num_seeds": [len(probs_a), len(probs_b)], "b": summarize(rep_b, pb, confidence=confidence),
                "diff": summarize(rep_a - rep_b, None if pa is None or pb is None else pa - pb, confidence=confidence),
                "p_a_not_better": one_sided_p(rep_a, rep_b), "p_b_not_better": one_sided_p(rep_b, rep_a)})
    for j, entry in enumerate(out["per_label"]):
        entry.update({"b": summarize(lab_b[:, j], lpb[j], confidence=confidence),
                      "diff": summarize(lab_a[:, j] - lab_b[:, j], lpa[j] - lpb[j], confidence=confidence),
                      "p_a_not_better": one_sided_p(lab_a[:, j], lab_b[:, j]),
                      "p_b_not_better": one_sided_p(lab_b[:, j], lab_a[:, j])})
    for key in ("p_a_not_better", "p_b_not_better"):
        for entry, q in zip(out["per_label"], benjamini_hochberg([e[key] for e in out["per_label"]])):
            entry[key + "_bh"] = q
    return out
