"""`config.mode = 'linear_probe'`: a multi-label logistic probe on frozen features of any encoder.

    python -m medssl_jax.main --config=configs/linear_probe.py --config.init=RUN/export --workdir=E

One flow, top to bottom (`run`):
  store (refused up front without labels or a test split) -> patient-wise splits (E/splits.json,
  evaluate/splits.py; validation = the store's own 'val' split when it has one) -> encoder from
  `config.init` (an export, a converted checkpoint or 'random': the architecture's standard init with
  BatchNorm statistics recomputed on the train images, `fair_random_init`) -> features of the
  train/val/test records, extracted once by the jitted forward of evaluate/features.py and cached in
  E/cache/<key>/ -> per label fraction: standardise with the fraction's train statistics, fit one L2
  logistic regression per label for every C of `config.c_grid` on the fraction's train patients, keep the
  C with the best validation mean AUC (never test; a C at the grid's edge is warned about), take each
  label's decision threshold at its Youden point on validation, predict test -> E/eval via
  records.write_eval (+ label_fractions.json with several fractions, + robustness.json with
  `config.robustness`).

The validation patients are only used to choose C and the thresholds; the probe is never refit on them,
so the label fractions are exactly the labelled data the probe saw. The end of every pretraining run
runs this mode too (evaluate/probe.py: run_after_pretraining). A label with a single class in a
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
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medssl_jax import checkpoint, config_lib, logging_lib, models, sharding
from medssl_jax.data import pipeline
from medssl_jax.data.store import Store
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import metrics, probe, records, robustness
from medssl_jax.evaluate.probe import C_GRID, select_and_fit
from medssl_jax.evaluate import splits as splits_lib

# Converted checkpoints record their file format; what their weights were trained with, for the report.
CONVERTED_METHODS = {"dinov2": "dinov2", "hf-dinov2": "dinov2", "dinov3": "dinov3", "hf-dinov3": "dinov3", "timm-npz": "supervised",
                     "timm": "supervised", "torchvision-resnet": "supervised"}


def reference_config() -> mlc.ConfigDict:
    """Every field of a linear-probe config (configs/linear_probe.py starts from this)."""
    c = config_lib.eval_config()
    c.mode = "linear_probe"
    c.feature = "pre_logits"  # which entry of the encoder's out_dict
    c.c_grid = C_GRID  # inverse L2 strengths tried on the validation patients (see evaluate/probe.py)
    return c


# ------------------------------------------------------------------------------------------ encoder

@dataclasses.dataclass
class Encoder:
    model: Any
    variables: Any
    model_config: dict
    method: str  # pretraining method of the weights ('none' for random)
    source: dict  # the export's "source" record ({} for random)
    baseline: dict | None = None  # how a random-init encoder was built (set by `fair_random_init`)


def fair_random_init(encoder: Encoder, store: Store, train_ids: np.ndarray, *, image_size: int, batch_size: int,
                     mesh, seed: int) -> Encoder:
    """Makes a random-init encoder a fair baseline: BatchNorm statistics recomputed on the train images.

    The initial running statistics (mean 0, variance 1) describe no image; with them a random ResNet's
    features are far worse than its architecture allows. The init itself is the architecture's standard
    one from `encoder.model_config` (configs set zero_init_last_bn=False for a probe baseline: with the
    last BN gamma of every residual branch at 0 every block is the identity and the "random ResNet" is its
    stem plus shortcuts). Returns the encoder with new variables and `baseline` describing both.
    """
    variables, used = features_lib.recalibrate_batch_stats(encoder.model, encoder.variables, store, train_ids,
                                                           image_size=image_size, batch_size=batch_size, mesh=mesh)
    zero_init = encoder.model_config.get("zero_init_last_bn")
    baseline = {
        "init": "random", "seed": int(seed), "architecture": dict(encoder.model_config),
        "residual_branches": ("zero-initialised last BN gamma (every block starts as its shortcut)" if zero_init
                              else "standard initialisation, every residual branch active"
                              if zero_init is not None else "standard initialisation"),
        "batch_stats": (f"recomputed on {used} train images (precise BN, eval preprocessing)" if used
                        else "none (the encoder has no BatchNorm)"),
    }
    if zero_init:
        logging_lib.log("warning: the random-init encoder has zero_init_last_bn=True: every residual branch is "
                        "off at init, a crippled baseline (set --config.model.zero_init_last_bn=False)")
    logging_lib.log(f"random-init baseline: {baseline['residual_branches']}; BatchNorm statistics "
                    f"{baseline['batch_stats']}")
    return dataclasses.replace(encoder, variables=variables, baseline=baseline)


def check_c_choice(best_c: float, c_grid) -> str | None:
    """A warning when the chosen C sits at an end of the grid (the best value may lie outside it)."""
    grid = sorted(float(c) for c in c_grid)
    if len(grid) > 1 and best_c in (grid[0], grid[-1]):
        side = "largest (weakest regularisation)" if best_c == grid[-1] else "smallest (strongest regularisation)"
        return (f"warning: the chosen C={best_c:g} is the {side} value of config.c_grid {tuple(grid)}; "
                "widen the grid")
    return None


def store_channels(store: Store, ids: np.ndarray) -> int:
    image = store[int(ids[0])]["image"]
    return 1 if image.ndim == 2 else int(image.shape[-1])


def check_init(config) -> None:
    """Fails fast, before any store or device work, on an unusable `config.init` (one line naming it)."""
    if not config.init:
        raise ValueError("config.init is empty: give an export directory (RUN/export), a converted checkpoint "
                         "directory (python -m medssl_jax.convert) or 'random'")
    if config.init == "random":
        if not config.model:
            raise ValueError("config.init='random' needs config.model (the encoder architecture, e.g. "
                             "{'name': 'resnet', 'depth': 50})")
    else:
        checkpoint.load_export_config(config.init)


def load_encoder(config, *, channels: int) -> Encoder:
    """The encoder `config.init` names, with its variables (host arrays), built at config.compute_dtype.

    'random': `config.model` is the architecture, initialised from config.seed. A directory: an export or
    converted checkpoint; its config.json gives the architecture and `checkpoint.load_encoder_init` loads
    the weights (an RGB stem into a 1-channel ResNet is summed over channels), failing with the first
    missing / unexpected / mis-shaped keys when they do not fit.
    """
    check_init(config)
    init = config.init
    if init == "random":
        model_config, source = config.model.to_dict(), {}
        method = "none"
    else:
        export = checkpoint.load_export_config(init)
        model_config, source = dict(export["model"]), dict(export.get("source", {}))
        method = source.get("method") or CONVERTED_METHODS.get(source.get("format", ""), "")
    model_config = _with_input_normalization(model_config, config, source)
    model = models.build_encoder({**model_config, "dtype": config.compute_dtype})
    example = jnp.zeros((1, config.image_size, config.image_size, channels), jnp.float32)
    init_fn = lambda key: model.init(key, example, train=False)  # noqa: E731
    if init == "random":
        variables = jax.device_get(jax.jit(init_fn)(jax.random.PRNGKey(config.seed)))
    else:
        variables = checkpoint.load_encoder_init(init, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    return Encoder(model, variables, model_config, config.method or method or "", source)


NORMALIZATIONS = ("auto", "none")


def _with_input_normalization(model_config: dict, config, source: dict) -> dict:
    """The encoder config with the input normalisation `config.input_normalization` asks for, logged."""
    choice = config.get("input_normalization", "auto")
    if choice not in NORMALIZATIONS:
        raise ValueError(f"config.input_normalization={choice!r} is not one of {list(NORMALIZATIONS)}")
    mean, std = model_config.get("input_mean") or (), model_config.get("input_std") or ()
    if not mean:
        logging_lib.log("input normalisation: none (pixels in [0, 1], as the encoder was trained)")
    elif choice == "none":
        logging_lib.log(f"input normalisation: none (config.input_normalization='none'; the encoder records "
                        f"mean {list(mean)} std {list(std)})")
    if not mean or choice == "none":
        return {k: v for k, v in model_config.items() if k not in ("input_mean", "input_std")}
    logging_lib.log(f"input normalisation: mean {list(mean)} std {list(std)}, the encoder's own "
                    f"({source.get('format') or 'export'}; --config.input_normalization=none to feed [0, 1])")
    return model_config


def feature_cache_key(config, encoder: Encoder, store_fingerprint: str) -> str:
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


def features_of(encoder: Encoder, store: Store, splits: splits_lib.Splits, config, *, mesh, forward,
                cache_dir: str) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(features [N, D], labels [N, L], record id -> row) for every record of the store splits the
    evaluation splits come from; extracted once per split (features_lib.extract, cached)."""
    names = [splits.params["train"], splits.params["test"]] + ([splits.params["val"]] if splits.params["val"] else [])
    parts = []
    for name in dict.fromkeys(names):
        parts.append(features_lib.extract(
            encoder.model, encoder.variables, store, split=name, image_size=config.image_size,
            batch_size=config.batch_size, mesh=mesh, feature=config.feature, forward=forward,
            cache_path=os.path.join(cache_dir, f"features_{name}.npz")))
    index = np.concatenate([p["index"] for p in parts])
    rows = {int(record): row for row, record in enumerate(index)}
    return np.concatenate([p["features"] for p in parts]), np.concatenate([p["labels"] for p in parts]), rows


# ------------------------------------------------------------------------------------------ robustness

def load_images(store: Store, ids: np.ndarray, *, image_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint16 [N, S, S, C] eval-preprocessed images and labels [N, L] of `ids`, in `ids` order."""
    load = pipeline.LoadForEval(store.data_source(), image_size=image_size, channels=store_channels(store, ids),
                                num_labels=len(store.label_names))
    images, labels = [], []
    for start in range(0, len(ids), batch_size):
        items = [load.map(int(i)) for i in ids[start:start + batch_size]]
        images.append(np.stack([item["image"] for item in items]))
        labels.append(np.stack([item["labels"] for item in items]))
    return np.concatenate(images), np.concatenate(labels)


def padded_apply(fn, images, mesh):
    """fn on a batch padded to a multiple of the device count and split over the mesh, cropped back."""
    images = np.asarray(images)
    n = images.shape[0]
    pad = (-n) % mesh.devices.size
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    return np.asarray(fn(jax.device_put(images, sharding.data_sharding(mesh))))[:n]


def check_single_host(what: str) -> None:
    if jax.process_count() > 1:
        raise ValueError(f"{what} runs on one host only (this job has {jax.process_count()} processes)")


# ------------------------------------------------------------------------------------------ run

def open_eval(config, workdir: str):
    """(absolute workdir, mesh, store) of an evaluation run (probe or fine-tune), after the checks every
    evaluation makes before any work: the init, the batch against the mesh, the image size, and a labelled
    store with train and test splits."""
    from medssl_jax.data import sources  # imported here to keep this module light for configs

    check_init(config)
    workdir = os.path.abspath(workdir)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    store = sources.open_store(config.data)
    config_lib.check_image_size(store, config.splits.test, config.image_size, field="image_size")
    problem = probe.unlabelled_reason(store, train=config.splits.train, test=config.splits.test)
    if problem:
        raise ValueError(f"cannot evaluate: {problem}; evaluation needs a labelled store with train and test "
                         "splits (python -m medssl_jax.ingest --csv=... --labels=... --test-fraction=...)")
    return workdir, mesh, store


def run(config, workdir: str) -> dict:
    """Runs the linear probe described in the module docstring; returns E/eval/summary.json's dict."""
    if config.sharding_rules:
        raise ValueError(f"config.sharding_rules={config.sharding_rules!r}: the linear probe replicates the frozen "
                         "encoder (it only runs forward passes); sharding rules apply to fine-tuning and pretraining")
    workdir, mesh, store = open_eval(config, workdir)
    fingerprint = records.store_fingerprint(store.path)
    fractions = splits_lib.check_fractions(config.label_fractions)
    splits = splits_lib.resolve(workdir, store, config.splits, fractions)
    logging_lib.log(splits_lib.describe(splits, store))

    encoder = load_encoder(config, channels=store_channels(store, splits.test))
    if config.init == "random":
        encoder = fair_random_init(encoder, store, splits.train, image_size=config.image_size,
                                   batch_size=config.batch_size, mesh=mesh, seed=config.seed)
    logging_lib.log(f"linear probe on {config.feature} features of {config.init} ({encoder.model_config.get('name')})")
    forward = features_lib.feature_fn(encoder.model, config.feature, mesh)
    cache_dir = os.path.join(workdir, "cache", feature_cache_key(config, encoder, fingerprint))
    feats, labels, rows = features_of(encoder, store, splits, config, mesh=mesh, forward=forward, cache_dir=cache_dir)
    take = lambda ids: np.fromiter((rows[int(i)] for i in ids), np.int64, count=len(ids))  # noqa: E731
    val_rows, test_rows = take(splits.val), take(splits.test)
    label_names = list(store.label_names)

    common = dict(label_names=label_names, mode="linear_probe", method=encoder.method, init=config.init,
                  split=splits.params["test"], store_name=store.name, store_fingerprint=fingerprint)
    results = {}
    for fraction in fractions:
        train_ids = splits.fraction_ids(fraction)
        train_rows = take(train_ids)
        fitted, best_c, by_c = select_and_fit(feats[train_rows], labels[train_rows], feats[val_rows], labels[val_rows],
                                             c_grid=config.c_grid, label_names=label_names)
        probs = fitted.predict(feats[test_rows])
        thresholds = metrics.youden_thresholds(fitted.predict(feats[val_rows]), labels[val_rows])
        edge = check_c_choice(best_c, config.c_grid)
        results[fraction] = dict(probe=fitted, probs=probs, c=best_c, by_c=by_c, num_train=len(train_ids),
                                 thresholds=thresholds, c_at_edge=edge is not None)
        unfit = [label_names[j] for j in np.flatnonzero(~fitted.fitted)]
        logging_lib.log(f"label fraction {fraction:g} ({len(train_ids)} train images): C={best_c:g}, val mean AUC "
                        f"{metrics.fmt_auc(by_c[best_c])}" + (f"; not fit (one class in train): {unfit}" if unfit else ""))
        if edge:
            logging_lib.log(edge)

    def extra(result):
        return {"c": result["c"], "val_mean_auc_by_c": {f"{c:g}": v for c, v in result["by_c"].items()},
                "num_train": result["num_train"], "feature": config.feature, "splits": splits.fingerprint,
                "source": encoder.source, "c_at_grid_edge": result["c_at_edge"],
                **({"baseline": encoder.baseline} if encoder.baseline else {}),
                "unfit_labels": [label_names[j] for j in np.flatnonzero(~result["probe"].fitted)]}

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
        check_single_host("config.robustness")
        logging_lib.log("robustness: perturbing the test images, recomputing features")
        images, _ = load_images(store, splits.test, image_size=config.image_size, batch_size=config.batch_size)
        variables = sharding.replicate(encoder.variables, mesh)
        curves = robustness.robustness_curves(
            lambda x: main["probe"].predict(padded_apply(lambda b: forward(variables, b), x, mesh)),
            images, test_labels, label_names=label_names, batch_size=config.batch_size)

    summary = records.write_eval(workdir, probs=main["probs"], labels=test_labels, record_ids=splits.test,
                                label_fraction=main_fraction, name=config.name or None, extra=extra(main),
                                label_fractions=entries, robustness_curves=curves, thresholds=main["thresholds"],
                                **common)
    per_label = ", ".join(f"{n} {metrics.fmt_auc(a)}" for n, a in summary["per_label_auc"].items())
    logging_lib.log(f"linear probe test mean AUC {metrics.fmt_auc(summary['mean_auc'])}; per label: {per_label}")
    logging_lib.log(f"wrote {os.path.join(workdir, 'eval')}")
    return summary


# ------------------------------------------------------------------------------------------ benchmark

def bench_features(model, variables, *, image_size: int, channels: int, batch_size: int, mesh, feature="pre_logits",
                   steps: int = 20) -> dict:
    """Images/s of the jitted feature forward (features.feature_fn) on a synthetic uint16 batch, device only."""
    forward = features_lib.feature_fn(model, feature, mesh)
    variables = sharding.replicate(variables, mesh)
    batch = jax.device_put(np.random.default_rng(0).integers(0, 65535, (batch_size, image_size, image_size, channels),
                                                             dtype=np.uint16), sharding.data_sharding(mesh))
    start = time.perf_counter()
    forward(variables, batch).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = forward(variables, batch)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / seconds, "compile_s": compile_s, "batch_size": batch_size,
            "image_size": image_size, "devices": int(mesh.devices.size), "platform": jax.devices()[0].platform}


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
    channels = store_channels(store, store.ids(args.split)) if store else 1
    encoder = load_encoder(config, channels=channels)
    result = bench_features(encoder.model, encoder.variables, image_size=args.image_size, channels=channels,
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
