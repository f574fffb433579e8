"""compare CLI end to end on fake evaluation workdirs; refusal on mismatched runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medssl_jax import compare
from medssl_jax.evaluate import records

NAMES = ["Atelectasis", "Cardiomegaly", "Edema/other"]


def _make(tmp_path, name, *, quality, init, seed, n=120, extras=True, shuffle=False, fingerprint="abc123"):
    rng = np.random.default_rng(0)                  # shared ground truth
    labels = (rng.random((n, 3)) < 0.35).astype(np.float32)
    labels[:10, 1] = np.nan
    labels[:, 2] = 0.0                              # undefined: no positives in test
    ids = np.arange(1000, 1000 + n)
    noise = np.random.default_rng(seed).random((n, 3))
    probs = quality * np.nan_to_num(labels) + (1 - quality) * noise
    if shuffle:                                     # record order must not matter
        perm = np.random.default_rng(seed).permutation(n)
        ids, labels, probs = ids[perm], labels[perm], probs[perm]
    wd = str(tmp_path / name)
    kw = {}
    if extras:
        steps = [100, 200, 300, 400]
        kw["curves"] = {"steps": steps, "val_auc": [0.6 + 0.05 * i + (0.1 if init != "random" else 0)
                                                    for i in range(4)]}
        kw["robustness_curves"] = {"rotation": [{"strength": s, "mean_auc": 0.9 - s / 100, "per_label": {}}
                                                for s in (0, 10, 20)]}
        kw["label_fractions"] = [{"fraction": f, "mean_auc": 0.7 + 0.1 * f, "ci_low": 0.6, "ci_high": 0.9}
                                 for f in (1.0, 0.1, 0.5)]
    records.write_eval(wd, probs=probs, labels=labels, record_ids=ids, label_names=NAMES, mode="finetune",
                      method="simclr" if init != "random" else "none", init=init, store_name="phantoms",
                      store_fingerprint=fingerprint, **kw)
    return wd


def test_compare_end_to_end(tmp_path, capsys):
    good = _make(tmp_path, "ssl", quality=0.7, init="RUN/export", seed=1)
    weak = _make(tmp_path, "random", quality=0.1, init="random", seed=2, shuffle=True)
    out = str(tmp_path / "R")
    assert compare.main([good, weak, f"--out={out}", "--num_resamples=200"]) == 0
    assert "ssl vs random" in capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"report.md", "comparison.json", "roc_all.png", "label_efficiency.png", "robustness.png",
            "convergence.png"} <= files
    assert sum(f.startswith("roc_0") for f in files) == 3
    comp = json.load(open(os.path.join(out, "comparison.json")))
    c = comp["bootstrap"]["comparisons"][0]
    assert (c["a"], c["b"]) == ("ssl", "random")
    assert c["mean_auc"]["p_a_not_better"] < 0.01
    assert c["per_label"]["Edema/other"]["p_a_not_better"] is None
    assert comp["convergence"][0]["ssl_steps"] == 200 and comp["convergence"][0]["random_steps"] == 400
    assert comp["convergence"][0]["reduction_pct"] == pytest.approx(50.0)
    assert [e["fraction"] for e in comp["label_efficiency"]["ssl"]] == [0.1, 0.5, 1.0]
    md = open(os.path.join(out, "report.md")).read()
    for text in ("Per-label AUC", "ssl vs random", "BH", "Operating points: random", "Label efficiency",
                 "Robustness", "Convergence", "50.0%", "Edema/other", "no positives"):
        assert text in md, text
    # The summary's AUC is sklearn's on the stored predictions.
    summ = json.load(open(os.path.join(good, "eval", "summary.json")))
    assert summ["mean_auc"] == pytest.approx(comp["bootstrap"]["models"]["ssl"]["mean_auc"]["point"])


def test_refuses_mismatched_runs(tmp_path, capsys):
    a = _make(tmp_path, "a", quality=0.5, init="x", seed=1, extras=False)
    fewer = _make(tmp_path, "fewer", quality=0.5, init="x", seed=1, extras=False, n=100)
    other_store = _make(tmp_path, "other", quality=0.5, init="x", seed=1, extras=False, fingerprint="zzz")
    out = str(tmp_path / "R")
    assert compare.main([a, fewer, f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "different test records" in err and err.count("\n") == 1
    assert compare.main([a, other_store, f"--out={out}"]) == 2
    assert "different stores" in capsys.readouterr().err
    # Same records, one label flipped.
    data = dict(np.load(os.path.join(fewer, "..", "a", "eval", "predictions.npz")))
    data["labels"][5, 0] = 1 - data["labels"][5, 0]
    np.savez(os.path.join(tmp_path, "a", "eval", "predictions.npz"), **data)
    b = _make(tmp_path, "b", quality=0.5, init="x", seed=1, extras=False)
    assert compare.main([a, b, f"--out={out}"]) == 2
    assert "different labels (first at record 1005" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "nope"), b, f"--out={out}"]) == 2
    assert "not a directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert compare.main([str(tmp_path / "empty"), b, f"--out={out}"]) == 2
    assert "summary.json: missing" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_module_entry_point(tmp_path):
    a = _make(tmp_path, "a", quality=0.5, init="x", seed=1, extras=False, n=40)
    proc = subprocess.run([sys.executable, "-m", "medssl_jax.compare", a, "--out", str(tmp_path / "R"),
                           "--num_resamples=50", "--no_youden_bootstrap"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(compare.__file__))))
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "R" / "report.md")
