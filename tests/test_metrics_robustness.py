"""robustness.py: perturbation geometry, robustness curves, convergence reduction, label-efficiency entries."""
import json

import numpy as np
import pytest

from medssl_jax.evaluate import robustness


def _images(n=3, h=8, w=8, c=2, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c)).astype(np.float32)


def test_identity_strengths_leave_images_unchanged():
    x = _images()
    for kind, s in robustness.IDENTITY.items():
        np.testing.assert_allclose(np.asarray(robustness.perturb(x, kind, s)), x, atol=1e-5, err_msg=kind)


def test_rotation_90_is_rot90_counter_clockwise_and_zoom_magnifies_centre():
    x = _images(h=7, w=7)
    got = np.asarray(robustness.perturb(x, "rotation", 90))
    np.testing.assert_allclose(got, np.rot90(x, 1, axes=(1, 2)), atol=1e-4)
    z = np.asarray(robustness.perturb(x, "zoom", 2.0))
    # Factor 2 about the centre pixel (3, 3): output (1, 1) samples source (2, 2).
    np.testing.assert_allclose(z[:, 1, 1], x[:, 2, 2], atol=1e-5)
    shrunk = np.asarray(robustness.perturb(x, "zoom", 0.5))
    assert np.all(shrunk[:, 0] == 0)                       # border filled with zeros


def test_intensity_and_gamma():
    x = _images()
    np.testing.assert_allclose(np.asarray(robustness.perturb(x, "intensity", 1.5)), np.clip(x * 1.5, 0, 1),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(robustness.perturb(x, "gamma", 2.0)), x ** 2, atol=1e-6)


def test_robustness_curves_on_a_toy_predictor():
    rng = np.random.default_rng(1)
    n = 40
    labels = (rng.random((n, 2)) < 0.5).astype(np.float64)
    images = np.zeros((n, 16, 16), np.uint16)
    images[labels[:, 0] == 1, 2:6, 2:6] = 60000            # label 0: bright square top-left
    images[labels[:, 1] == 1, 10:14, 10:14] = 60000        # label 1: bright square bottom-right
    images = images + rng.integers(0, 2000, images.shape).astype(np.uint16)

    def predict_fn(batch):
        batch = np.asarray(batch)
        return np.stack([batch[:, 2:6, 2:6, 0].mean((1, 2)), batch[:, 10:14, 10:14, 0].mean((1, 2))], 1)

    curves = robustness.robustness_curves(predict_fn, images, labels,
                                          {"rotation": [0, 180], "intensity": [1.0, 0.5]},
                                          label_names=["tl", "br"], batch_size=16)
    json.dumps(curves, allow_nan=False)
    assert [e["strength"] for e in curves["rotation"]] == [0.0, 180.0]
    assert curves["rotation"][0]["mean_auc"] == pytest.approx(1.0)
    assert curves["rotation"][1]["mean_auc"] < 0.8          # squares swap places
    assert curves["intensity"][1]["per_label"]["tl"] == pytest.approx(1.0)
    swapped = curves["rotation"][1]  # the 95% bootstrap CI of the mean AUC brackets it (plotted as a band)
    assert swapped["ci_low"] < swapped["mean_auc"] < swapped["ci_high"] and swapped["ci_high"] - swapped["ci_low"] < 0.5


def test_bad_perturbation_inputs():
    with pytest.raises(robustness.RobustnessError, match="unknown 'blur'"):
        robustness.perturb(_images(), "blur", 1.0)
    with pytest.raises(robustness.RobustnessError, match="gamma strength: must be > 0"):
        robustness.check_grid({"gamma": [0.0]})
    with pytest.raises(robustness.RobustnessError, match="predict_fn: returned shape"):
        robustness.robustness_curves(lambda b: np.zeros((len(b), 3)), _images(n=4), np.zeros((4, 2)),
                                     {"gamma": [1.0]})


def test_convergence_reduction_definition():
    random_curve = {"steps": [100, 200, 300, 400], "val_auc": [0.6, 0.7, 0.8, 0.79]}
    ssl_curve = [(100, 0.75), (200, 0.81), (300, 0.85), (400, 0.86)]
    r = robustness.convergence_reduction(ssl_curve=ssl_curve, random_curve=random_curve)
    assert r["target_val_auc"] == 0.8 and r["random_steps"] == 300 and r["ssl_steps"] == 200
    assert r["reduction_pct"] == pytest.approx(100 / 3)
    never = robustness.convergence_reduction(ssl_curve={"steps": [1, 2], "val_auc": [0.5, 0.6]},
                                             random_curve=random_curve)
    assert never["reduction_pct"] is None and "never reached" in never["note"]
    with pytest.raises(robustness.RobustnessError, match="strictly increasing"):
        robustness.convergence_reduction(ssl_curve={"steps": [2, 1], "val_auc": [0.5, 0.6]},
                                         random_curve=random_curve)


def test_label_efficiency_entry_and_curve():
    rng = np.random.default_rng(2)
    labels = (rng.random((100, 2)) < 0.4).astype(float)
    probs = 0.5 * labels + 0.5 * rng.random((100, 2))
    e = robustness.label_efficiency_entry(fraction=0.1, probs=probs, labels=labels, label_names=["a", "b"],
                                          num_train=12, num_resamples=100)
    assert e["ci_low"] <= e["mean_auc"] <= e["ci_high"] and e["num_train"] == 12
    curve = robustness.label_efficiency_curve([{"fraction": 1.0, "mean_auc": 0.9}, e])
    assert [c["fraction"] for c in curve] == [0.1, 1.0]
    with pytest.raises(robustness.RobustnessError, match="duplicate fractions"):
        robustness.label_efficiency_curve([e, e])
