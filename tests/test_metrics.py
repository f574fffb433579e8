"""metrics.py against scikit-learn: ties, missing labels, one-class labels, Youden, resample weights."""
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from medssl_jax.evaluate import metrics


def _data(seed=0, n=200, num_labels=4):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_labels)) < 0.3).astype(np.float64)
    # Coarse scores force many ties, within and across classes.
    probs = np.round(np.clip(0.3 * labels + rng.random((n, num_labels)) * 0.7, 0, 1), 1)
    labels[rng.random(n) < 0.2, 1] = np.nan       # label 1 partly missing
    labels[:, 2] = 0.0                             # label 2: no positives in test
    return probs, labels


def test_per_label_auc_equals_sklearn_with_ties_and_missing():
    probs, labels = _data()
    res = metrics.evaluate_predictions(probs=probs, labels=labels, label_names=["a", "b", "c", "d"])
    for j, name in enumerate("abd"):
        col = "abcd".index(name)
        keep = ~np.isnan(labels[:, col])
        ref = skm.roc_auc_score(labels[keep, col], probs[keep, col])
        assert res["per_label"][name]["auc"] == pytest.approx(ref, abs=1e-12)
    assert res["per_label"]["b"]["n_missing"] == int(np.isnan(labels[:, 1]).sum())
    assert res["per_label"]["c"]["auc"] is None
    assert "no positives" in res["per_label"]["c"]["note"]
    assert res["undefined_labels"] == ["c"]
    defined = [res["per_label"][n]["auc"] for n in "abd"]
    assert res["mean_auc"] == pytest.approx(np.mean(defined), abs=1e-12)
    json.dumps(res, allow_nan=False)               # JSON-serialisable, undefined -> null


def test_all_labels_undefined_does_not_crash():
    probs = np.random.default_rng(1).random((10, 2))
    labels = np.zeros((10, 2))
    labels[:, 1] = np.nan
    res = metrics.evaluate_predictions(probs=probs, labels=labels, label_names=["x", "y"])
    assert res["mean_auc"] is None and res["num_defined_labels"] == 0
    assert "every label is missing" in res["per_label"]["y"]["note"]


def test_youden_matches_roc_curve_argmax():
    probs, labels = _data(seed=3)
    y, s = labels[:, 0], probs[:, 0]
    fpr, tpr, thr = skm.roc_curve(y, s)
    t = thr[np.argmax(tpr - fpr)]
    pred = s >= t
    res = metrics.youden_point(s, y)
    assert res["threshold"] == t
    assert res["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert res["specificity"] == pytest.approx(skm.recall_score(1 - y, ~pred))
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert res["f1"] == pytest.approx(skm.f1_score(y, pred))


def test_youden_picks_leading_inf_threshold_for_useless_scores():
    y = np.array([1.0, 0, 1, 0])
    s = np.array([0.1, 0.9, 0.2, 0.8])            # perfectly wrong: J <= 0 everywhere but at inf
    res = metrics.youden_point(s, y)
    assert res["threshold"] == math.inf and res["sensitivity"] == 0 and res["f1"] == 0


def test_grouped_roc_stats_equals_sklearn_on_resamples():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(5, 50))
        s = np.round(rng.random(n), int(rng.integers(1, 3)))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        idx = rng.integers(0, n, size=(6, n))
        w = np.stack([np.bincount(i, minlength=n) for i in idx])
        out = metrics.grouped_roc_stats(s, y, w)
        for b in range(len(idx)):
            yy, ss = y[idx[b]].astype(float), s[idx[b]]
            if yy.min() == yy.max():
                assert all(np.isnan(out[k][b]) for k in out)
                continue
            assert out["auc"][b] == pytest.approx(skm.roc_auc_score(yy, ss), abs=1e-12)
            ref = metrics.youden_point(ss, yy)
            for k in metrics.YOUDEN_KEYS:
                assert out[k][b] == pytest.approx(ref[k], abs=1e-12)


@pytest.mark.parametrize("probs, labels, names, match", [
    (np.zeros((3, 2)), np.zeros((3, 3)), None, "labels: shape"),
    (np.zeros((3, 2)), np.full((3, 2), 2.0), None, "labels: values"),
    (np.full((3, 2), np.nan), np.zeros((3, 2)), None, "probs: non-finite"),
    (np.zeros((3, 2)), np.zeros((3, 2)), ["a"], "label_names"),
    (np.zeros((0, 2)), np.zeros((0, 2)), None, "probs: no examples"),
])
def test_bad_input_one_line_error(probs, labels, names, match):
    with pytest.raises(metrics.MetricsError, match=match) as e:
        metrics.evaluate_predictions(probs=probs, labels=labels, label_names=names or ["a", "b"])
    assert "\n" not in str(e.value)


def test_grouped_youden_follows_roc_curve_drop_intermediate_on_exact_ties():
    # Scores shared by one positive and one negative each: every ROC step is (1, 1), J is mathematically
    # constant along the diagonal, and only float rounding plus roc_curve's dropped intermediate points
    # decide the argmax (for several of these sizes a plain argmax over all points picks another point).
    for n_pairs in range(2, 33):
        for top in range(3):
            s = np.r_[np.arange(top) + 10.0, np.repeat(np.arange(n_pairs, 0, -1) * 1.0, 2), -1]
            y = np.r_[np.ones(top, bool), np.tile([True, False], n_pairs), False]
            w = np.stack([np.ones(len(s), int), np.full(len(s), 2)])
            out = metrics.grouped_roc_stats(s, y, w)
            ref = metrics.youden_point(s, y.astype(float))
            for k in metrics.YOUDEN_KEYS:
                assert out[k] == pytest.approx([ref[k], ref[k]], abs=1e-12), (n_pairs, top, k)


def test_label_mapping_for_distribution_shift():
    model = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "Edema"]
    store = ["Effusion", "Nodule", "Atelectasis", "Edema"]
    mcols, scols, names = metrics.label_mapping(model, store, {"Effusion": "Pleural Effusion"})
    assert names == ["Pleural Effusion", "Atelectasis", "Edema"]
    assert [model[i] for i in mcols] == names and [store[i] for i in scols] == ["Effusion", "Atelectasis",
                                                                                "Edema"]
    with pytest.raises(metrics.MetricsError, match="'Mass' is not a store label"):
        metrics.label_mapping(model, store, {"Mass": "Edema"})
    with pytest.raises(metrics.MetricsError, match="share no label"):
        metrics.label_mapping(["a"], ["b"])
    with pytest.raises(metrics.MetricsError, match="mapped twice"):
        metrics.label_mapping(model, store, {"Nodule": "Edema"})


def test_operating_point_at_validation_thresholds_and_the_oracle():
    # Thresholds chosen on one split and applied to another give exactly the confusion counts of
    # `scores >= threshold`; the split's own Youden point is kept, labelled as the (optimistic) oracle.
    val_probs, val_labels = _data(seed=3)
    test_probs, test_labels = _data(seed=4)
    thresholds = metrics.youden_thresholds(val_probs, val_labels)
    assert thresholds[2] is None                     # label c has no positives in "val"
    res = metrics.evaluate_predictions(probs=test_probs, labels=test_labels, label_names=list("abcd"),
                                       thresholds=thresholds)
    oracle = metrics.evaluate_predictions(probs=test_probs, labels=test_labels, label_names=list("abcd"))
    assert res["threshold_source"] == "validation" and oracle["threshold_source"] == "oracle"
    for j, name in enumerate("abd"):
        col = "abcd".index(name)
        keep = ~np.isnan(test_labels[:, col])
        y, pred = test_labels[keep, col] == 1, test_probs[keep, col] >= thresholds[col]
        entry = res["per_label"][name]
        assert entry["threshold"] == pytest.approx(thresholds[col])
        assert (entry["tp"], entry["fp"], entry["fn"]) == (int((pred & y).sum()), int((pred & ~y).sum()),
                                                           int((~pred & y).sum()))
        assert entry["sensitivity"] == pytest.approx((pred & y).sum() / y.sum())
        assert entry["oracle"] == {k: oracle["per_label"][name][k] for k in ("threshold",) + metrics.YOUDEN_KEYS}
        # The test split's own Youden point maximises sensitivity + specificity on test: never worse.
        assert (entry["oracle"]["sensitivity"] + entry["oracle"]["specificity"]
                >= entry["sensitivity"] + entry["specificity"] - 1e-12)
    assert res["mean_youden_oracle"] == oracle["mean_youden"]
    with pytest.raises(metrics.MetricsError, match="thresholds"):
        metrics.evaluate_predictions(probs=test_probs, labels=test_labels, label_names=list("abcd"),
                                     thresholds=[0.5])
