"""`config.mode = 'linear_probe'`: a multi-label logistic probe on frozen features of any encoder.

    python -m medssl_jax.main --config=configs/linear_probe.py --config.init=RUN/export --workdir=E

One flow, top to bottom (`run`):
  store (refused up front without labels or a test split) -> patient-wise splits (E/splits.json,
  evaluate/splits.py; validation = the store's own 'val' split when it has one) -> encoder from
  `config.init` (an export, a converted checkpoint or 'random': the architecture's standard init with
  BatchNorm statistics recomputed on the train images, `encoders.fair_random_init`; a random ResNet once per
  residual-branch init of `config.random_zero_init_grid`, chosen with C on validation) -> features of the
  train/val/test records, extracted once by the jitted forward of evaluate/features.py and cached in
  E/cache/<key>/ -> per label fraction: standardise with the fraction's train statistics, fit one L2
  logistic regression per label for every C of `config.c_grid` on the fraction's train patients, keep the
  C with the best validation mean AUC (never test; a C at the grid's edge is warned about), take each
  label's decision threshold at its Youden point on validation, predict test -> E/eval via
  records.write_eval (+ label_fractions.json with several fractions, + robustness.json with
  `config.robustness`).

The validation patients are only used to choose C and the thresholds; the probe is never refit on them,
so the label fractions are exactly the labelled data the probe saw. The end of every pretraining run
runs this mode too (evaluate/after_pretraining.py). A label with a single class in a
fraction's train records cannot be fit and scores 0.5 (AUC 0.5).

Robustness (Ghesu): the test images are perturbed on the device (evaluate/robustness.py), features are
recomputed with the same jitted forward and the fitted probe scores them. Single-host only.

`python -m medssl_jax.evaluate.linear_probe --bench ...` measures the feature-extraction rate (see `main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from medssl_jax import config_lib, jsonio, logging_lib, sharding
from medssl_jax.data.store import Store
from medssl_jax.evaluate import encoders, metrics, probe, records, robustness, workspace
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import splits as splits_lib

def reference_config() -> mlc.ConfigDict:
    """Every field of a linear-probe config (configs/linear_probe.py starts from this)."""
    c = config_lib.eval_config()
    c.mode = "linear_probe"
    c.feature = "pre_logits"  # which entry of the encoder's out_dict
    c.c_grid = probe.C_GRID  # inverse L2 strengths tried on the validation patients (see evaluate/probe.py)
    # init='random' with a ResNet: its residual-branch init is a hyperparameter of that init like C. Every
    # branch active (False) or every branch starting as its shortcut (True, how pretraining starts): the probe
    # is fit on both and each label fraction keeps the one with the better validation mean AUC (ties: the
    # first). Measured on MedMNIST validation, either can win (BENCHMARKS.md, "Transfer").
    c.random_zero_init_grid = (False, True)
    return c


def feature_cache_key(config, encoder: encoders.Encoder, store_fingerprint: str) -> str:
    """Names the cached features: encoder weights identity, feature, size, dtype and store."""
    if config.init == "random":
        weights = {"random": encoder.model_config, "seed": int(config.seed), "batch_stats": "precise-bn-train"}
    else:
        stat = os.stat(os.path.join(config.init, "config.json"))  # rewritten last by every export
        weights = {"init": os.path.abspath(config.init), "mtime_ns": stat.st_mtime_ns}
    key = {**weights, "feature": config.feature, "image_size": int(config.image_size),
           "dtype": config.compute_dtype, "store": store_fingerprint}
    normalization = [list(encoder.model_config.get(k) or ()) for k in ("input_mean", "input_std")]
    if any(normalization):  # keys of runs without one stay as they were
        key["input_normalization"] = normalization
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def features_of(encoder: encoders.Encoder, store: Store, splits: splits_lib.Splits, config, *, mesh, forward,
                cache_dir: str, roles=("train", "test", "val")) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(features [N, D], labels [N, L], record id -> row) for every record of the store splits the
    evaluation splits `roles` come from; extracted once per split (features_lib.extract, cached)."""
    names = [splits.params[role] for role in roles if splits.params[role]]  # no 'val': carved from train
    parts = []
    for name in dict.fromkeys(names):
        parts.append(features_lib.extract(
            encoder.model, encoder.variables, store, split=name, image_size=config.image_size,
            batch_size=config.batch_size, mesh=mesh, feature=config.feature, forward=forward,
            cache_path=os.path.join(cache_dir, f"features_{name}.npz")))
    index = np.concatenate([p["index"] for p in parts])
    rows = {int(record): row for row, record in enumerate(index)}
    return np.concatenate([p["features"] for p in parts]), np.concatenate([p["labels"] for p in parts]), rows


@dataclasses.dataclass
class Candidate:
    """An encoder the probe is fit on, with its features of every evaluation record."""
    encoder: encoders.Encoder
    forward: Any
    features: np.ndarray  # [N, D], rows in the order of `_encoders`' record-id map
    zero_init_last_bn: bool | None = None  # a random ResNet's residual-branch init (None: not a choice)

    @property
    def label(self) -> str:
        return "zero-initialised residual branches" if self.zero_init_last_bn else "active residual branches"


def _encoders(config, store: Store, splits: splits_lib.Splits, *, mesh, fingerprint: str,
              workdir: str, roles=("train", "test", "val")) -> tuple[list[Candidate], np.ndarray, dict[int, int]]:
    """(candidates, labels [N, L], record id -> row): the encoder `config.init` names with its features; for
    init='random' with a ResNet, one fair random encoder per value of `config.random_zero_init_grid` (each
    fraction keeps the better one on validation). Every candidate's features cover the same records."""
    channels = store.channels(splits.test)
    grid = [None]
    if config.init == "random" and config.model and encoders.has_residual_init_choice(config.model):
        grid = list(config.random_zero_init_grid)
    candidates = []
    for zero_init in grid:
        variant = config
        if zero_init is not None:
            variant = config.copy_and_resolve_references()
            variant.model.zero_init_last_bn = bool(zero_init)
        encoder = encoders.load_encoder(variant, channels=channels)
        if config.init == "random":
            encoder = encoders.fair_random_init(encoder, store, splits.train, image_size=config.image_size,
                                                batch_size=config.batch_size, mesh=mesh, seed=config.seed)
        logging_lib.log(f"linear probe on {config.feature} features of {config.init} "
                        f"({encoder.model_config.get('name')})")
        forward = features_lib.feature_fn(encoder.model, config.feature, mesh)
        cache_dir = os.path.join(workdir, "cache", feature_cache_key(variant, encoder, fingerprint))
        feats, labels, rows = features_of(encoder, store, splits, config, mesh=mesh, forward=forward,
                                          cache_dir=cache_dir, roles=roles)
        candidates.append(Candidate(encoder, forward, feats, zero_init))
    return candidates, labels, rows


def _finite_or_minus_inf(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else -np.inf


def run(config, workdir: str, *, store: Store | None = None) -> dict:
    """Runs the linear probe described in the module docstring; returns E/eval/summary.json's dict.
    `store`: config.data's store when the caller has it open."""
    if config.sharding_rules:
        raise ValueError(f"config.sharding_rules={config.sharding_rules!r}: the linear probe replicates the frozen "
                         "encoder (it only runs forward passes); sharding rules apply to fine-tuning and pretraining")
    workdir, mesh, store = workspace.open_eval(config, workdir, store=store)
    fingerprint = records.store_fingerprint(store.path)
    fractions = splits_lib.check_fractions(config.label_fractions)
    splits = splits_lib.resolve(workdir, store, config.splits, fractions)
    logging_lib.log(splits_lib.describe(splits, store))

    roles = ("train", "test", "val") if config.read_test else ("train", "val")
    candidates, labels, rows = _encoders(config, store, splits, mesh=mesh, fingerprint=fingerprint, workdir=workdir,
                                         roles=roles)
    take = lambda ids: np.fromiter((rows[int(i)] for i in ids), np.int64, count=len(ids))  # noqa: E731
    val_rows = take(splits.val)
    test_rows = take(splits.test) if config.read_test else None
    label_names = list(store.label_names)

    common = dict(label_names=label_names, mode="linear_probe", method=candidates[0].encoder.method, init=config.init,
                  split=splits.params["test"], store_name=store.name, store_fingerprint=fingerprint)
    results = {}
    for fraction in fractions:
        train_ids = splits.fraction_ids(fraction)
        train_rows = take(train_ids)
        fits = []  # per candidate: (fitted probe, its C, validation mean AUC by C)
        for candidate in candidates:
            feats = candidate.features
            fits.append(probe.select_and_fit(feats[train_rows], labels[train_rows], feats[val_rows], labels[val_rows],
                                             c_grid=config.c_grid, label_names=label_names))
        val_auc = [by_c[best_c] for _, best_c, by_c in fits]
        pick = int(np.argmax([_finite_or_minus_inf(v) for v in val_auc]))  # ties keep the first
        chosen, (fitted, best_c, by_c) = candidates[pick], fits[pick]
        probs = fitted.predict(chosen.features[test_rows]) if config.read_test else None
        val_probs = fitted.predict(chosen.features[val_rows])
        thresholds = metrics.youden_thresholds(val_probs, labels[val_rows])
        # Per label on validation: where a mean hides a finding the features miss, without reading test.
        val_per_label = dict(zip(label_names, map(metrics.json_number,
                                                  metrics.per_label_auc(val_probs, labels[val_rows]))))
        edge = probe.check_c_choice(best_c, config.c_grid)
        choice = None
        if len(candidates) > 1:
            choice = {"chosen": chosen.label, "zero_init_last_bn": chosen.zero_init_last_bn,
                      "val_mean_auc": {c.label: v for c, v in zip(candidates, val_auc)}}
        results[fraction] = dict(probe=fitted, probs=probs, c=best_c, by_c=by_c, num_train=len(train_ids),
                                 val_per_label_auc=val_per_label,
                                 thresholds=thresholds, c_at_edge=edge is not None, encoder=chosen, choice=choice)
        unfit = [label_names[j] for j in np.flatnonzero(~fitted.fitted)]
        which = ""
        if choice:
            scores = ", ".join(f"{c.label} {metrics.fmt_auc(v)}" for c, v in zip(candidates, val_auc))
            which = f"; random init with {chosen.label} (validation mean AUC: {scores})"
        logging_lib.log(f"label fraction {fraction:g} ({len(train_ids)} train images): C={best_c:g}, val mean AUC "
                        f"{metrics.fmt_auc(by_c[best_c])} ("
                        + ", ".join(f"{n} {metrics.fmt_auc(a)}" for n, a in val_per_label.items()) + ")" + which
                        + (f"; not fit (one class in train): {unfit}" if unfit else ""))
        if edge:
            logging_lib.log(edge)

    def extra(result):
        encoder = result["encoder"].encoder
        return {"c": result["c"], "val_mean_auc_by_c": {f"{c:g}": v for c, v in result["by_c"].items()},
                "num_train": result["num_train"], "feature": config.feature, "splits": splits.fingerprint,
                "val_per_label_auc": result["val_per_label_auc"],
                "source": encoder.source, "c_at_grid_edge": result["c_at_edge"],
                **({"baseline": encoder.baseline} if encoder.baseline else {}),
                **({"random_init_choice": result["choice"]} if result["choice"] else {}),
                "unfit_labels": [label_names[j] for j in np.flatnonzero(~result["probe"].fitted)]}

    if not config.read_test:
        return _write_validation_only(workdir, config, results, extra)

    test_labels = labels[test_rows]
    entries = None
    if len(fractions) > 1:
        entries = []
        for fraction, result in results.items():
            records.write_eval(os.path.join(workdir, "fractions", f"f{fraction:g}"), probs=result["probs"],
                              labels=test_labels, record_ids=splits.test, label_fraction=fraction,
                              name=f"{config.name or os.path.basename(workdir)}@{fraction:g}", extra=extra(result),
                              thresholds=result["thresholds"], **common)
            entries.append(robustness.label_efficiency_entry(
                fraction=fraction, probs=result["probs"], labels=test_labels, label_names=label_names,
                num_train=result["num_train"], seed=config.seed))

    main_fraction = max(fractions)
    main = results[main_fraction]
    curves = None
    if config.robustness:
        sharding.check_single_host("config.robustness")
        logging_lib.log("robustness: perturbing the test images, recomputing features")
        images, _ = features_lib.load_images(store, splits.test, image_size=config.image_size, batch_size=config.batch_size)
        chosen = main["encoder"]
        variables = sharding.replicate(chosen.encoder.variables, mesh)
        curves = robustness.robustness_curves(
            lambda x: main["probe"].predict(features_lib.padded_apply(lambda b: chosen.forward(variables, b), x, mesh)),
            images, test_labels, label_names=label_names, batch_size=config.batch_size)

    summary = records.write_eval(workdir, probs=main["probs"], labels=test_labels, record_ids=splits.test,
                                label_fraction=main_fraction, name=config.name or None, extra=extra(main),
                                label_fractions=entries, robustness_curves=curves, thresholds=main["thresholds"],
                                **common)
    per_label = ", ".join(f"{n} {metrics.fmt_auc(a)}" for n, a in summary["per_label_auc"].items())
    logging_lib.log(f"linear probe test mean AUC {metrics.fmt_auc(summary['mean_auc'])}; per label: {per_label}")
    logging_lib.log(f"wrote {os.path.join(workdir, 'eval')}")
    return summary


def _write_validation_only(workdir: str, config, results: dict, extra) -> dict:
    """config.read_test=False: E/validation.json holds each fraction's choices and validation scores; no
    test prediction exists."""
    out = {"read_test": False, "init": config.init,
           "fractions": [{"fraction": fraction, "val_mean_auc": result["by_c"][result["c"]],
                          **extra(result)} for fraction, result in results.items()]}
    if jax.process_index() == 0:
        jsonio.write_json(os.path.join(workdir, records.VALIDATION_FILE), out)
    logging_lib.log(f"validation only (config.read_test=False): the test split was not read; wrote "
                    f"{os.path.join(workdir, records.VALIDATION_FILE)}")
    return out


def read_validation_only(workdir: str) -> dict:
    """{fraction: entry} of E/validation.json (a config.read_test=False probe)."""
    with open(os.path.join(workdir, records.VALIDATION_FILE)) as f:
        return {float(e["fraction"]): e for e in json.load(f)["fractions"]}


# ------------------------------------------------------------------------------------------ benchmark CLI

def main(argv=None) -> int:
    """`python -m medssl_jax.evaluate.linear_probe --bench --init=DIR|random [--model=JSON] [--store=PATH]`:
    prints the device-only forward rate and, with --store, the end-to-end extraction rate of a split
    (decode + crop + resize on the host, forward on the device)."""
    parser = argparse.ArgumentParser(prog="python -m medssl_jax.evaluate.linear_probe", description=main.__doc__)
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--init", default="random")
    parser.add_argument("--model", default='{"name": "resnet", "depth": 50}', help="encoder JSON for --init=random")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--store", default="")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    config = reference_config()
    config.init, config.image_size, config.compute_dtype = args.init, args.image_size, args.dtype
    config.model = json.loads(args.model)
    mesh = sharding.make_mesh()
    store = Store(args.store) if args.store else None
    channels = store.channels(store.ids(args.split)) if store else 1
    encoder = encoders.load_encoder(config, channels=channels)
    result = features_lib.bench_features(encoder.model, encoder.variables, image_size=args.image_size, channels=channels,
                            batch_size=args.batch_size, mesh=mesh, steps=args.steps)
    if store:
        start = time.perf_counter()
        extracted = features_lib.extract(encoder.model, encoder.variables, store, split=args.split,
                                         image_size=args.image_size, batch_size=args.batch_size, mesh=mesh)
        result["end_to_end_images_per_s"] = len(extracted["index"]) / (time.perf_counter() - start)
    print(json.dumps({"model": encoder.model_config, "dtype": args.dtype, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
