"""Paired bootstrap: determinism, shared indices, p-value sanity, BH, agreement with a per-replicate loop."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from medssl_jax.evaluate import bootstrap, metrics


def _preds(seed=0, n=300, num_labels=3):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_labels)) < 0.3).astype(np.float64)
    labels[rng.random(n) < 0.1, 0] = np.nan
    good = np.clip(0.6 * labels + 0.4 * rng.random((n, num_labels)), 0, 1)
    good = np.nan_to_num(good, nan=0.5)
    bad = rng.random((n, num_labels))
    return labels, good, bad


def test_indices_are_deterministic_in_seed():
    a = bootstrap.bootstrap_indices(50, num_resamples=20, seed=3)
    b = bootstrap.bootstrap_indices(50, num_resamples=20, seed=3)
    c = bootstrap.bootstrap_indices(50, num_resamples=20, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    counts = bootstrap.resample_counts(a, 50)
    np.testing.assert_array_equal(counts[5], np.bincount(a[5], minlength=50))


def test_replicates_equal_sklearn_on_each_resample_for_every_model():
    labels, good, bad = _preds(n=60)
    idx = bootstrap.bootstrap_indices(60, num_resamples=25, seed=1)
    reps = bootstrap.replicate_stats({"good": good, "bad": bad}, labels, idx, num_threads=2)
    for name, probs in (("good", good), ("bad", bad)):       # the same idx rows for both models
        for b in range(len(idx)):
            for j in range(labels.shape[1]):
                y, s = labels[idx[b], j], probs[idx[b], j]
                keep = ~np.isnan(y)
                got = reps[name]["auc"][b, j]
                if len(np.unique(y[keep])) < 2:
                    assert np.isnan(got)
                    continue
                assert got == pytest.approx(skm.roc_auc_score(y[keep], s[keep]), abs=1e-12)
                yp = metrics.youden_point(s[keep], y[keep])
                assert reps[name]["f1"][b, j] == pytest.approx(yp["f1"], abs=1e-12)
    auc_only = bootstrap.replicate_stats({"good": good}, labels, idx, youden=False)
    np.testing.assert_allclose(auc_only["good"]["auc"], reps["good"]["auc"], atol=1e-12)


def test_paired_bootstrap_deterministic_and_p_values_sane():
    labels, good, bad = _preds()
    kw = dict(labels=labels, label_names=["a", "b", "c"], num_resamples=200, seed=0)
    r1 = bootstrap.paired_bootstrap(probs={"good": good, "bad": bad, "same": good.copy()}, **kw)
    r2 = bootstrap.paired_bootstrap(probs={"good": good, "bad": bad, "same": good.copy()}, **kw)
    assert json.dumps(r1, allow_nan=False) == json.dumps(r2, allow_nan=False)
    gb = r1["comparisons"][0]
    assert (gb["a"], gb["b"]) == ("good", "bad")
    assert gb["mean_auc"]["p_a_not_better"] < 0.01
    assert gb["mean_auc"]["p_b_not_better"] > 0.99
    for lab in "abc":
        assert gb["per_label"][lab]["p_a_not_better"] < 0.01
        assert gb["per_label"][lab]["p_a_not_better_bh"] >= gb["per_label"][lab]["p_a_not_better"]
        assert gb["per_label"][lab]["diff"]["ci_low"] > 0
    same = r1["comparisons"][1]                                  # good vs same: identical predictions
    assert (same["a"], same["b"]) == ("good", "same")
    assert same["mean_auc"]["p_a_not_better"] == 1.0 and same["mean_auc"]["p_b_not_better"] == 1.0
    m = r1["models"]["good"]["mean_auc"]
    assert m["ci_low"] <= m["point"] <= m["ci_high"]
    assert m["point"] == pytest.approx(r1["models"]["good"]["metrics"]["mean_auc"])


def test_one_class_label_is_undefined_not_a_crash():
    labels, good, bad = _preds(n=80)
    labels[:, 2] = 0.0                         # no positives at all
    labels[:, 1] = 0.0
    labels[:2, 1] = 1.0                        # only 2 positives: many replicates have none
    r = bootstrap.paired_bootstrap(probs={"good": good, "bad": bad}, labels=labels,
                                   label_names=["a", "b", "c"], num_resamples=100, seed=0)
    c = r["comparisons"][0]["per_label"]["c"]
    assert c["p_a_not_better"] is None and c["p_a_not_better_bh"] is None
    assert r["models"]["good"]["per_label"]["c"]["auc"]["num_valid"] == 0
    assert 0 < r["models"]["good"]["per_label"]["b"]["auc"]["num_valid"] < 100
    assert any(n.startswith("b: ") for n in r["notes"])
    json.dumps(r, allow_nan=False)


def test_benjamini_hochberg_hand_example():
    # Sorted p: 0.01, 0.02, 0.03, 0.04, 0.20 (m = 5): p*m/rank = 0.05, 0.05, 0.05, 0.05, 0.20;
    # then the running minimum from the top keeps them. Order of input must be preserved.
    p = [0.04, 0.01, 0.20, 0.03, 0.02]
    assert bootstrap.benjamini_hochberg(p) == pytest.approx([0.05, 0.05, 0.20, 0.05, 0.05])
    # Step-up monotonicity: 0.01, 0.04, 0.045 (m = 3) -> 0.03, 0.045, 0.045.
    assert bootstrap.benjamini_hochberg([0.045, 0.01, 0.04]) == pytest.approx([0.045, 0.03, 0.045])
    # Undefined entries are not in the family.
    assert bootstrap.benjamini_hochberg([None, 0.01, 0.04]) == [None, pytest.approx(0.02),
                                                                pytest.approx(0.04)]


def test_format_p_and_bad_input():
    assert bootstrap.format_p(0.0, 1000) == "< 0.001"
    assert bootstrap.format_p(0.0123, 1000) == "0.0123"
    with pytest.raises(bootstrap.BootstrapError, match="model 'x': labels: shape"):
        bootstrap.paired_bootstrap(probs={"x": np.zeros((5, 2))}, labels=np.zeros((4, 2)),
                                   label_names=["a", "b"])
    with pytest.raises(bootstrap.BootstrapError, match="num_resamples"):
        bootstrap.bootstrap_indices(5, num_resamples=0)


def test_large_resample_matches_sklearn_and_bench_runs():
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.random(n) < 0.05
    s = np.where(rng.random(n) < 0.5, np.round(rng.random(n), 2), rng.random(n))   # mixed ties / distinct
    idx = bootstrap.bootstrap_indices(n, num_resamples=3, seed=9)
    counts = bootstrap.resample_counts(idx, n)
    fast = metrics.weighted_auc(s, y, counts)
    full = metrics.grouped_roc_stats(s, y, counts)
    for b in range(3):
        ref = skm.roc_auc_score(y[idx[b]], s[idx[b]])
        assert fast[b] == pytest.approx(ref, abs=1e-12) and full["auc"][b] == pytest.approx(ref, abs=1e-12)
        yp = metrics.youden_point(s[idx[b]], y[idx[b]].astype(float))
        assert full["sensitivity"][b] == pytest.approx(yp["sensitivity"], abs=1e-12)
    res = bootstrap.bench_bootstrap(num_examples=200, num_labels=2, num_resamples=20)
    assert res["auc_seconds"] > 0 and res["youden_cpu_seconds"] > 0


def test_fixed_threshold_replicates_equal_the_operating_point_on_each_resample():
    rng = np.random.default_rng(7)
    labels = (rng.random((150, 2)) < 0.3).astype(np.float64)
    probs = np.round(0.4 * labels + 0.6 * rng.random((150, 2)), 2)
    thresholds = [0.5, 0.35]
    indices = bootstrap.bootstrap_indices(150, num_resamples=20, seed=1)
    reps = bootstrap.replicate_stats({"m": probs}, labels, indices, thresholds={"m": thresholds})["m"]
    for b in (0, 7, 19):
        idx = indices[b]
        for j in range(2):
            ref = metrics.operating_point(probs[idx, j], labels[idx, j], thresholds[j])
            for k in metrics.YOUDEN_KEYS:
                assert reps[k][b, j] == pytest.approx(ref[k], abs=1e-12)
    result = bootstrap.paired_bootstrap(probs={"m": probs, "n": probs[::-1]}, labels=labels, label_names=["a", "b"],
                                        num_resamples=50, thresholds={"m": thresholds})
    assert result["models"]["m"]["threshold_source"] == "validation"
    assert result["models"]["n"]["threshold_source"] == "oracle"
