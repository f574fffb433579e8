"""The probe that ends every pretraining run, and its fair baseline.

`run` probes the exported encoder with the linear_probe mode (evaluate/linear_probe.py) on the run's
store, then a random-init encoder of the same architecture (evaluate/encoders.py: for a ResNet with every
residual branch active and with every branch starting as its shortcut, the better on validation kept;
BatchNorm statistics recomputed on the train images) on the same splits, and compares the two by
a paired bootstrap of their test predictions. `skip_reason` says why a store cannot be probed (no labels
or no test split: the normal case for an unlabelled pretraining store).
"""

from __future__ import annotations

import os
from typing import Any

from medssl_jax import checkpoint, jsonio, logging_lib
from medssl_jax.data.store import Store
from medssl_jax.evaluate import bootstrap, encoders, linear_probe, records, workspace


def skip_reason(store: Store, probe_config) -> str | None:
    """Why the end-of-pretraining probe cannot run on `store` (None when it can): no labels, or an empty
    train or test split. Unlabelled, test-less stores are the normal case for pretraining."""
    return workspace.unlabelled_reason(store, train=probe_config.train_split, test=probe_config.test_split)


def probe_eval_config(export_dir: str, data_config, probe_config, *, mesh, seed: int, compute_dtype: str):
    """The linear_probe-mode config of the end-of-pretraining probe of `export_dir` on the run's store."""
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


def compare_with_baseline(workdir: str, baseline_workdir: str, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the two evaluation workdirs' test predictions (the code `compare` runs):
    {"mean_auc_diff", "ci95": [lo, hi], "p_value" (one-sided: share of resamples in which the first is not
    better), "num_resamples", "num_test_images"}."""
    runs = [records.read_eval(workdir), records.read_eval(baseline_workdir)]
    runs[0].name, runs[1].name = "pretrained", "random_init"
    _, labels, probs = records.align_runs(runs)
    boot = bootstrap.paired_bootstrap(probs=probs, labels=labels, label_names=runs[0].label_names,
                                      num_resamples=num_resamples, seed=seed, youden=False)
    diff = boot["comparisons"][0]["mean_auc"]
    return {"mean_auc_diff": diff["diff"]["point"], "ci95": [diff["diff"]["ci_low"], diff["diff"]["ci_high"]],
            "p_value": diff["p_a_not_better"], "num_resamples": int(num_resamples),
            "num_test_images": int(len(labels))}


def run(export_dir: str, data_config, probe_config, *, mesh, seed: int, workdir: str,
        compute_dtype: str = "float32", store: Store | None = None) -> dict[str, Any]:
    """Probes the exported encoder (-> WORKDIR/eval/) and a fair random-init encoder of the same
    architecture (-> WORKDIR/baselines/random_init/eval/) on the same splits, both in the evaluation-workdir
    format that `python -m medssl_jax.compare` reads. WORKDIR/eval/summary.json also carries `random_init`
    (its AUCs and how it was built) and `vs_random_init` (paired bootstrap of the mean-AUC difference).
    `store`: the run's store (data_config's), already open."""
    config = probe_eval_config(export_dir, data_config, probe_config, mesh=mesh, seed=seed,
                               compute_dtype=compute_dtype)
    logging_lib.log(f"linear probe on {probe_config.feature} features of {export_dir}")
    summary = linear_probe.run(config, workdir, store=store)
    if not probe_config.random_baseline:
        return summary
    baseline_dir = os.path.join(workdir, "baselines", "random_init")
    random_config = config.copy_and_resolve_references()
    random_config.init = "random"
    random_config.method = "none"
    random_config.name = "random_init"
    random_config.model = encoders.random_baseline_model(checkpoint.load_export_config(export_dir)["model"])
    random_config.splits.file = os.path.join(workdir, "splits.json")
    random_config.seed = seed + 1
    logging_lib.log("linear probe on a random-init encoder of the same architecture (the baseline)")
    baseline = linear_probe.run(random_config, baseline_dir, store=store)
    summary["random_init"] = {"mean_auc": baseline["mean_auc"], "per_label_auc": baseline["per_label_auc"],
                              "workdir": baseline_dir, "baseline": baseline["extra"].get("baseline"),
                              **({"choice": baseline["extra"]["random_init_choice"]}
                                 if "random_init_choice" in baseline["extra"] else {})}
    summary["vs_random_init"] = compare_with_baseline(workdir, baseline_dir, seed=seed)
    jsonio.write_json(os.path.join(workdir, "eval", "summary.json"), summary)
    return summary
