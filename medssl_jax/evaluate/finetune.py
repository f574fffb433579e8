"""`config.mode = 'finetune'`: end-to-end fine-tuning of an encoder + linear head, selected on validation.

    python -m medssl_jax.main --config=configs/finetune.py --config.init=RUN/export --workdir=E

One flow, top to bottom (`run`):
  store -> patient-wise splits (E/splits.json, evaluate/splits.py) -> per label fraction (`train_fraction`):
    encoder from `config.init` (export / converted checkpoint / 'random', see linear_probe.load_encoder)
    + models.LinearClassifier head on the encoder's pooled features
    -> labelled, shuffled Grain iterator over the fraction's train records (per-record random-resized
       crop + flip on the host, pipeline.SampleViews) -> jitted step under NamedSharding (device-side
       augmentation from medssl_jax.augment, BCE with per-label pos_weight from the fraction's train
       labels, NaN = missing masked, or with `task='multi_class'` softmax cross-entropy over one-hot
       label columns; optax optimiser from medssl_jax.optim)
    -> every `eval_every` steps: validation mean AUC (metrics.evaluate_predictions) -> curves.json;
       the best validation step is kept, training stops after `early_stop_patience` evaluations
       without improvement. The test split is only ever predicted with that best model.
  -> E/eval via records.write_eval(mode="finetune", curves=...) for the largest fraction, with
     label_fractions.json when there are several (each fraction also in E/fractions/f<F>/eval),
     robustness.json with `config.robustness`, and the selected model in E/export (encoder, usable as
     --config.init) + E/export/head.npz.
  -> with `config.shift_store`: zero-shot evaluation of the selected model on that store's
     `shift_split`, labels mapped by name and `config.label_map` (metrics.label_mapping), into
     E/shift/eval with that store's fingerprint (Azizi's distribution-shift test).

Not done: resuming an interrupted fine-tune (a rerun starts again; the splits are checked to be equal).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from medssl_jax import augment, checkpoint, config_lib, logging_lib, losses, optim, sharding
from medssl_jax.data import pipeline
from medssl_jax.data.store import Store
from medssl_jax.evaluate import linear_probe, metrics, records, robustness
from medssl_jax.evaluate import splits as splits_lib
from medssl_jax.models import heads, input_norm


def reference_config() -> mlc.ConfigDict:
    """Every field of a fine-tuning config (configs/finetune.py and configs/dinov2_finetune.py start here)."""
    c = config_lib.eval_config()
    c.mode = "finetune"
    c.batch_size = 64
    # Duration: total_steps, or total_epochs over the train images of each label fraction.
    c.total_steps = -1
    c.total_epochs = 30.0
    c.eval_every = -1  # steps between validation evaluations; -1 = once per epoch
    c.early_stop_patience = 5  # evaluations without a better validation mean AUC; 0 = never stop early
    c.log_every = 50
    # Host-side geometry: random-resized crop (scale, aspect ratio) of each image, then flip p 0.5.
    # crop_scale (1.0, 1.0) with crop_ratio (1.0, 1.0) is the centre square crop alone (no crop augmentation).
    c.crop_scale = (0.08, 1.0)
    c.crop_ratio = (3 / 4, 4 / 3)
    c.flip = True
    # Device-side photometric augmentation + rotation (medssl_jax/augment.py fields).
    c.augment = augment.preset("azizi_cxr")
    c.optim = optim.default_config("sgd")
    c.optim.nesterov = True
    c.optim.base_lr = 0.1
    c.optim.weight_decay = 0.0
    # Distribution shift: evaluate the selected model on another store (labels mapped by name, plus
    # `label_map` pairs (shift-store label, model label) for names that differ).
    c.shift_store = ""
    c.shift_split = "test"
    c.label_map = ()
    c.save_model = True  # write the selected encoder to E/export (+ head.npz)
    # Whole-model transfer from a fine-tune on another store (Tayebi Arasteh et al.'s in-domain supervised
    # arm): config.init is that run's E/export, and the head rows of the labels its head.npz also has
    # (matched by name, case-insensitive) start from it; the other rows start fresh.
    c.init_head = False
    # 'multi_label': sigmoid + BCE with pos_weight (chest X-rays); 'multi_class': softmax cross-entropy over
    # one-hot label columns (Azizi et al.'s dermatology task), scored by top-1 accuracy and the macro
    # one-vs-rest AUC (the mean AUC of the one-hot columns).
    c.task = "multi_label"
    return c


class FinetuneError(ValueError):
    """Fine-tuning cannot go on (one line saying why)."""


def aligned_head(kernel: np.ndarray, bias: np.ndarray, label_names, saved: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """`kernel` [D, L] / `bias` [L] with the columns of the labels `saved` (a head.npz: kernel, bias,
    label_names) also has replaced by its columns; returns them and the names that were transferred."""
    saved_names = [str(n).lower() for n in saved["label_names"]]
    if saved["kernel"].shape[0] != kernel.shape[0]:
        raise FinetuneError(f"config.init_head: the saved head takes {saved['kernel'].shape[0]} features, this "
                            f"encoder gives {kernel.shape[0]}")
    kernel, bias, moved = np.array(kernel), np.array(bias), []
    for column, name in enumerate(label_names):
        if name.lower() in saved_names:
            source = saved_names.index(name.lower())
            kernel[:, column], bias[column] = saved["kernel"][:, source], saved["bias"][source]
            moved.append(name)
    return kernel, bias, moved


class Classifier(nn.Module):
    """Encoder + linear head on its pooled features; returns (logits, out_dict) like every model here."""

    encoder: nn.Module
    num_labels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        features, encoder_out = self.encoder(x, train=train)
        logits, _ = heads.LinearClassifier(self.num_labels, name="head")(features)
        return logits, {"encoder": encoder_out, "features": features, "logits": logits}


# ------------------------------------------------------------------------------------------ data

class _WithLabels(grain.transforms.Map):
    """SampleViews output (one crop, record ids) -> {"image": uint16 [S, S, C], "labels": float32 [L]}."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def map(self, element: dict) -> dict:
        return {"image": element["image"][0], "labels": self.labels[int(element["record_ids"][0])]}


def make_train_iterator(store: Store, ids: np.ndarray, *, image_size: int, crop_scale, crop_ratio, flip: bool,
                        batch_size_per_host: int, seed: int, num_workers: int = 0):
    """Endless shuffled labelled batches {"image": uint16 [B, S, S, C], "labels": float32 [B, L]} of `ids`.

    Each element is one record: pipeline.SampleViews crops it (random-resized crop with `crop_scale` /
    `crop_ratio`, resize, flip p 0.5 if `flip`) with randomness Grain derives from (seed, host, position).
    Hosts take every process_count-th record.
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    host_ids = np.asarray(ids, np.int64)[process_index::process_count]
    if len(host_ids) < batch_size_per_host:
        raise ValueError(f"store {store.path}: {len(host_ids)} train images on this host, fewer than the "
                         f"batch of {batch_size_per_host} (lower config.batch_size or use a larger label fraction)")
    crops = [{"name": "image", "num": 1, "size": image_size, "scale": tuple(crop_scale), "ratio": tuple(crop_ratio),
              "flip": flip}]
    views = pipeline.SampleViews(store.data_source(), (np.arange(len(host_ids) + 1), host_ids), crops,
                                 with_record_ids=True)
    host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    dataset = (grain.MapDataset.range(len(host_ids)).seed(host_seed).shuffle().repeat(None)
               .random_map(views).map(_WithLabels(store.labels.astype(np.float32)))
               .batch(batch_size_per_host, drop_remainder=True))
    return pipeline.to_iterator(dataset, num_workers=num_workers, num_threads=2, prefetch_batches=4)


def predict(predict_fn, variables, store: Store, ids: np.ndarray, *, image_size: int, batch_size: int, mesh,
            channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, L], labels [N, L]) of `ids` in `ids` order: centre crop (pipeline.LoadForEval), jitted
    forward over the global batch; hosts take every process_count-th id, padded to equal length."""
    process_index, process_count = jax.process_index(), jax.process_count()
    per_host = sharding.per_host(batch_size)
    host_ids = np.asarray(ids, np.int64)[process_index::process_count]
    num_batches = -(-(-(-len(ids) // process_count)) // per_host)
    padded = np.full(num_batches * per_host, -1, np.int64)
    padded[:len(host_ids)] = host_ids
    load = pipeline.LoadForEval(store.data_source(), image_size=image_size, channels=channels,
                                num_labels=len(store.label_names))
    dataset = grain.MapDataset.source(padded).map(load).batch(per_host, drop_remainder=True)
    probs, labels, index = [], [], []
    for local in pipeline.to_iterator(dataset, num_workers=0, num_threads=2, prefetch_batches=2):
        out = predict_fn(variables, sharding.to_global({"image": local["image"]}, mesh)["image"])
        out = multihost_utils.process_allgather(out, tiled=True)
        rest = multihost_utils.process_allgather({k: local[k] for k in ("labels", "index", "mask")}, tiled=True)
        keep = np.asarray(rest["mask"]).astype(bool)
        probs.append(np.asarray(out)[keep])
        labels.append(np.asarray(rest["labels"])[keep])
        index.append(np.asarray(rest["index"])[keep])
    probs, labels, index = np.concatenate(probs), np.concatenate(labels), np.concatenate(index)
    order = {int(record): row for row, record in enumerate(index)}
    rows = np.array([order[int(i)] for i in ids])
    return probs[rows], labels[rows]


# ------------------------------------------------------------------------------------------ training

def pos_weight_for(labels: np.ndarray, label_names) -> tuple[np.ndarray, list[str]]:
    """(N - P) / P per label from the train labels; a label without positives gets weight 1 (and is named)."""
    present = np.nansum(labels, axis=0) > 0
    weight = np.ones(labels.shape[1], np.float32)
    if present.any():
        weight[present] = losses.pos_weight_from_labels(labels[:, present])
    return weight, [label_names[j] for j in np.flatnonzero(~present)]


def train_fraction(config, store: Store, splits: splits_lib.Splits, fraction: float, *, mesh, run_dir: str,
                   channels: int) -> dict[str, Any]:
    """Fine-tunes on one label fraction; returns the selected model, its test predictions and the curve."""
    label_names = list(store.label_names)
    train_ids = splits.fraction_ids(fraction)
    pos_weight, no_positive = pos_weight_for(store.labels[train_ids], label_names)
    if no_positive:
        logging_lib.log(f"label fraction {fraction:g}: no positive train example for {no_positive} (pos_weight 1)")
    steps_per_epoch = max(1, len(train_ids) // config.batch_size)
    total_steps = config_lib.to_steps(config, "total", epoch_size=len(train_ids), batch_size=config.batch_size)
    eval_every = config.eval_every if config.eval_every > 0 else steps_per_epoch

    encoder = linear_probe.load_encoder(config, channels=channels)
    model = Classifier(encoder.model, len(label_names))
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    example = jnp.zeros((1, config.image_size, config.image_size, channels), jnp.float32)
    head_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax.device_get(jax.jit(lambda k: model.init(k, example, train=False))(head_key))
    variables = {collection: {**tree, "encoder": encoder.variables[collection]} if collection in encoder.variables
                 else tree for collection, tree in variables.items()}
    if config.init_head:
        variables["params"]["head"]["dense"] = _head_from_init(config, variables["params"]["head"]["dense"],
                                                               label_names)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps, batch_size=config.batch_size)
    state = {"step": np.zeros((), np.int32), "params": variables["params"],
             "batch_stats": variables.get("batch_stats", {})}
    # Replicated, or sharded by config.sharding_rules (FSDP for ViT-L/g); the step, the predictions and the
    # selected model all use this layout.
    shardings = sharding.state_shardings({**state, "opt_state": jax.eval_shape(tx.init, state["params"])}, mesh,
                                         config.sharding_rules)
    var_shardings = {k: shardings[k] for k in ("params", "batch_stats")}
    state = jax.device_put(state, {k: shardings[k] for k in state})
    state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
    pos_weight = jnp.asarray(pos_weight)
    multi_class = config.task == "multi_class"

    def train_step(state, batch):
        rng = jax.random.fold_in(step_key, state["step"])  # a rerun replays the same randomness
        aug_key, dropout_key = jax.random.split(rng)
        images = augment.augment_views(batch["image"], rng=aug_key, cfg=config.augment)

        def loss_of(params):
            (logits, _), updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                                               train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
            if multi_class:
                loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=batch["labels"]))
            else:
                loss = losses.bce_with_pos_weight(logits=logits, labels=batch["labels"], pos_weight=pos_weight)
            return loss, updates.get("batch_stats", state["batch_stats"])

        (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "batch_stats": batch_stats, "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}

    train_step = jax.jit(train_step, donate_argnums=(0,), in_shardings=(shardings, data),
                         out_shardings=(shardings, repl))
    predict_fn = jax.jit(
        lambda v, x: (jax.nn.softmax if multi_class else jax.nn.sigmoid)(model.apply(v, augment.to_unit(x),
                                                                                     train=False)[0]),
        in_shardings=(var_shardings, data), out_shardings=data)
    evaluate = lambda v, ids, on=store: predict(predict_fn, v, on, ids, image_size=config.image_size,  # noqa: E731
                                                batch_size=config.batch_size, mesh=mesh, channels=channels)

    iterator = make_train_iterator(
        store, train_ids, image_size=config.image_size, crop_scale=config.crop_scale, crop_ratio=config.crop_ratio,
        flip=config.flip, batch_size_per_host=sharding.per_host(config.batch_size), seed=config.seed,
        num_workers=config.data.num_workers)
    writer = logging_lib.MetricWriter(run_dir)
    progress = logging_lib.Progress(total_steps, items_per_step=config.batch_size, unit="images")
    stop_rule = (f"until the validation AUC has not improved for {config.early_stop_patience} evaluations, at most "
                 f"{total_steps} steps" if config.early_stop_patience > 0 else f"for {total_steps} steps")
    logging_lib.log(f"fine-tuning on {fraction:.0%} of the train patients ({len(train_ids)} images) {stop_rule} of "
                    f"{config.batch_size}, validation every {eval_every} steps on {len(splits.val)} images")
    curve_steps, curve_auc = [], []
    best = {"step": None, "val_auc": -np.inf, "variables": None, "val_probs": None, "val_labels": None}
    stopped_early = False
    evals_since_best = 0
    step = 0
    while step < total_steps:
        state, step_metrics = train_step(state, sharding.to_global(next(iterator), mesh))
        step += 1
        if step % config.log_every == 0 or step == total_steps:
            host = jax.device_get(step_metrics)
            if not np.isfinite(host["loss"]):
                raise FinetuneError(f"non-finite fine-tuning loss {float(host['loss'])} at step {step} "
                                    "(lower config.optim.base_lr?)")
            progress.update(step)
            writer.write(step, {**host, "images_per_s": progress.rate})
            logging_lib.log(progress.line(step, loss=float(host["loss"]), lr=float(host["lr"])))
        if step % eval_every == 0 or step == total_steps:
            current = {"params": state["params"], "batch_stats": state["batch_stats"]}
            probs, labels = evaluate(current, splits.val)
            val_auc = metrics.evaluate_predictions(probs=probs, labels=labels, label_names=label_names)["mean_auc"]
            curve_steps.append(step)
            curve_auc.append(val_auc)
            writer.write(step, {"val_mean_auc": np.nan if val_auc is None else val_auc})
            improved = val_auc is not None and val_auc > best["val_auc"]
            logging_lib.log(f"step {step}: validation mean AUC {metrics.fmt_auc(val_auc)}"
                            + (" (best so far)" if improved else ""))
            if improved or best["variables"] is None:
                best = {"step": step, "val_auc": val_auc if val_auc is not None else -np.inf,
                        "variables": sharding.to_host(current), "val_probs": probs, "val_labels": labels}
                evals_since_best = 0
            else:
                evals_since_best += 1
                if config.early_stop_patience > 0 and evals_since_best >= config.early_stop_patience:
                    logging_lib.log(f"early stop at step {step}: no better validation AUC in {evals_since_best} "
                                    f"evaluations (best {best['val_auc']:.4f} at step {best['step']})")
                    stopped_early = True
                    break
    writer.close()
    if config.early_stop_patience > 0 and not stopped_early:
        logging_lib.log(f"warning: label fraction {fraction:g} reached the maximum of {total_steps} steps while the "
                        f"validation AUC was still improving (best at step {best['step']}); it may not have "
                        "converged: raise config.total_steps")
    best_variables = jax.device_put(best["variables"], var_shardings)
    test_probs, test_labels = evaluate(best_variables, splits.test)
    return {"fraction": fraction, "num_train": len(train_ids), "probs": test_probs, "labels": test_labels,
            "curves": {"steps": curve_steps, "val_auc": curve_auc}, "best_step": best["step"],
            "best_val_auc": None if not np.isfinite(best["val_auc"]) else float(best["val_auc"]),
            "variables": best["variables"], "var_shardings": var_shardings, "predict_fn": predict_fn,
            "evaluate": evaluate, "encoder": encoder,
            "pos_weight": [float(w) for w in pos_weight], "steps_run": step, "total_steps": total_steps,
            "converged": bool(stopped_early),
            "thresholds": metrics.youden_thresholds(best["val_probs"], best["val_labels"])}


TASKS = ("multi_label", "multi_class")


def _check_task(config, store: Store) -> None:
    if config.task not in TASKS:
        raise FinetuneError(f"config.task={config.task!r} is not one of {list(TASKS)}")
    if config.task == "multi_class":
        labels = np.asarray(store.labels, np.float64)
        bad = metrics.not_one_hot_rows(labels)
        if bad or labels.shape[1] < 2:
            raise FinetuneError(f"config.task='multi_class' needs one-hot labels (at least 2 classes, exactly one 1 "
                                f"per record); store {store.path} has {labels.shape[1]} label columns and {bad} of "
                                f"its {len(labels)} records are not one-hot (a multi-label store: task='multi_label')")


def _head_from_init(config, dense: dict, label_names) -> dict:
    path = os.path.join(config.init, "head.npz")
    if config.init == "random" or not os.path.isfile(path):
        raise FinetuneError(f"config.init_head=True needs config.init to be a fine-tune's export with head.npz "
                            f"(E/export); {config.init!r} has none")
    with np.load(path) as saved:
        kernel, bias, moved = aligned_head(np.asarray(dense["kernel"]), np.asarray(dense["bias"]), label_names,
                                           {k: saved[k] for k in ("kernel", "bias", "label_names")})
    fresh = [n for n in label_names if n not in moved]
    logging_lib.log(f"head initialised from {path} for {moved or 'no label'}"
                    + (f"; fresh for {fresh}" if fresh else ""))
    return {"kernel": kernel, "bias": bias}


# ------------------------------------------------------------------------------------------ run

def run(config, workdir: str) -> dict:
    """Runs the fine-tuning described in the module docstring; returns E/eval/summary.json's dict."""
    workdir, mesh, store = linear_probe.open_eval(config, workdir)
    _check_task(config, store)
    shift = _open_shift(config, store)  # fail on a bad shift store / label map before training
    fingerprint = records.store_fingerprint(store.path)
    fractions = splits_lib.check_fractions(config.label_fractions)
    splits = splits_lib.resolve(workdir, store, config.splits, fractions)
    logging_lib.log(splits_lib.describe(splits, store))
    channels = linear_probe.store_channels(store, splits.test)
    label_names = list(store.label_names)
    name = config.name or os.path.basename(workdir)

    results, entries = {}, []
    for fraction in fractions:
        run_dir = workdir if fraction == max(fractions) else os.path.join(workdir, "fractions", f"f{fraction:g}")
        result = train_fraction(config, store, splits, fraction, mesh=mesh, run_dir=run_dir, channels=channels)
        logging_lib.log(f"label fraction {fraction:g}: best validation mean AUC "
                        f"{metrics.fmt_auc(result['best_val_auc'])} at step {result['best_step']}")
        if fraction != max(fractions):
            _write(run_dir, result, config, splits, store, fingerprint, name=f"{name}@{fraction:g}")
            result = {k: v for k, v in result.items()
                      if k not in ("variables", "var_shardings", "predict_fn", "evaluate")}
        results[fraction] = result
        if len(fractions) > 1:
            entries.append(robustness.label_efficiency_entry(
                fraction=fraction, probs=result["probs"], labels=result["labels"], label_names=label_names,
                num_train=result["num_train"], seed=config.seed))

    main = results[max(fractions)]
    best_variables = jax.device_put(main["variables"], main["var_shardings"])
    curves = None
    if config.robustness:
        linear_probe.check_single_host("config.robustness")
        logging_lib.log("robustness: evaluating the selected model on perturbed test images")
        images, _ = linear_probe.load_images(store, splits.test, image_size=config.image_size,
                                             batch_size=config.batch_size)
        curves = robustness.robustness_curves(
            lambda x: linear_probe.padded_apply(lambda b: main["predict_fn"](best_variables, b), x, mesh),
            images, main["labels"], label_names=label_names, batch_size=config.batch_size)
    summary = _write(workdir, main, config, splits, store, fingerprint, name=config.name or None,
                     label_fractions=entries or None, robustness_curves=curves)
    per_label = ", ".join(f"{n} {metrics.fmt_auc(a)}" for n, a in summary["per_label_auc"].items())
    if summary["top1_accuracy"] is not None:
        logging_lib.log(f"fine-tune test top-1 accuracy {summary['top1_accuracy']:.4f} (multi-class; the mean AUC "
                        "below is the macro one-vs-rest AUC)")
    logging_lib.log(f"fine-tune test mean AUC {metrics.fmt_auc(summary['mean_auc'])} (model of step "
                    f"{main['best_step']}, chosen on validation); per label: {per_label}")

    if config.save_model and jax.process_index() == 0:
        export_dir = os.path.join(workdir, "export")
        encoder = main["encoder"]
        checkpoint.save_export(
            export_dir, {c: tree["encoder"] for c, tree in main["variables"].items() if "encoder" in tree},
            {"model": encoder.model_config, "input": {"image_size": config.image_size, "channels": channels,
                                                      "normalization": input_norm.recorded(encoder.model_config)},
             "source": {"method": "finetune", "init": config.init, "init_method": encoder.method,
                        "store": store.name, "steps": main["best_step"], "label_names": label_names}})
        head = main["variables"]["params"]["head"]["dense"]
        np.savez(os.path.join(export_dir, "head.npz"), kernel=np.asarray(head["kernel"]),
                 bias=np.asarray(head["bias"]), label_names=np.asarray(label_names))
        logging_lib.log(f"saved the selected model to {export_dir} (encoder export + head.npz)")

    if shift is not None:
        shift_store, model_cols, store_cols, names = shift
        ids = shift_store.ids(config.shift_split)
        probs, labels = main["evaluate"](best_variables, ids, shift_store)
        shift_summary = records.write_eval(
            os.path.join(workdir, "shift"), probs=probs[:, model_cols], labels=labels[:, store_cols],
            record_ids=ids, label_names=names, mode="eval", method=main["encoder"].method, init=config.init,
            split=config.shift_split, store_name=shift_store.name,
            store_fingerprint=records.store_fingerprint(shift_store.path), name=f"{name} on {shift_store.name}",
            extra={"finetuned_on": {"store": store.name, "fingerprint": fingerprint}, "best_step": main["best_step"]})
        logging_lib.log(f"distribution shift ({shift_store.name}, {len(ids)} images, labels {names}): mean AUC "
                        f"{metrics.fmt_auc(shift_summary['mean_auc'])} -> {os.path.join(workdir, 'shift', 'eval')}")
    logging_lib.log(f"wrote {os.path.join(workdir, 'eval')}")
    return summary


def _open_shift(config, store: Store):
    """(store, model columns, store columns, names) for the distribution-shift evaluation, or None."""
    if not config.shift_store:
        if config.label_map:
            raise ValueError("config.label_map is set but config.shift_store is empty")
        return None
    pairs = list(config.label_map)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ValueError(f"config.label_map={config.label_map!r}: expected pairs (shift-store label, model label)")
    shift_store = Store(config.shift_store)
    model_cols, store_cols, names = metrics.label_mapping(store.label_names, shift_store.label_names,
                                                          {str(a): str(b) for a, b in pairs})
    if len(shift_store.ids(config.shift_split)) == 0:  # an unknown split raises StoreError here too
        raise ValueError(f"config.shift_split={config.shift_split!r} has no records in {config.shift_store}")
    return shift_store, model_cols, store_cols, names


def _write(directory, result, config, splits, store, fingerprint, *, name, **optional) -> dict:
    return records.write_eval(
        directory, probs=result["probs"], labels=result["labels"], record_ids=splits.test,
        label_names=list(store.label_names), mode="finetune", method=result["encoder"].method, init=config.init,
        split=splits.params["test"], store_name=store.name, store_fingerprint=fingerprint,
        label_fraction=result["fraction"], name=name, curves=result["curves"],
        extra={"best_step": result["best_step"], "best_val_auc": result["best_val_auc"],
               "steps_run": result["steps_run"], "total_steps": result["total_steps"],
               "num_train": result["num_train"], "pos_weight": result["pos_weight"], "splits": splits.fingerprint,
               "source": result["encoder"].source, "converged": result["converged"],
               "early_stop_patience": int(config.early_stop_patience)},
        thresholds=result["thresholds"], **optional)
