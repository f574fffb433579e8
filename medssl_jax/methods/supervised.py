"""Supervised fine-tuning as a Method: the one train loop (train.py) fine-tunes like it pretrains.

The model is an encoder + linear head (`models.heads.Classifier`); one random-resized crop (+ flip) per
image on the host, the config's photometric augmentation on the device; the loss is per-label sigmoid BCE
with pos_weight (NaN labels masked) or, with `supervised.task='multi_class'`, softmax cross-entropy over
one-hot label columns. The encoder starts from `config.init` like any pretraining run (train.py), the head
fresh (or from `supervised.head_init`, a head.npz already aligned to this store's labels).

With `supervised.ema_decay` > 0 the method state keeps an exponential moving average of the weights and of
BatchNorm's statistics (`method_state["ema"]`), and the EMA model is what is evaluated and kept
(`evaluated_variables`, `export_variables`). Fine-tuning on a few hundred images ends wherever the last
mini-batches left it: the validation AUC of one run moves by several points between evaluations 50 steps
apart and the models of two seeds differ as much; the average over the last ~1/(1 - decay) steps does not.
The EMA starts at the weights of step 0 (after `config.init` replaced the encoder) and its decay warms up
as min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage with num_updates), so a
short run is not pulled back to its initial weights.

What differs between the runs of a transfer study is data, not code: pos_weight and the run's seed are in
`method_state`, the learning-rate schedule in the optimiser state (optim.make_finetune_optimizer), and the
init reads all of them, and an LP-FT head, as arguments (`init_inputs`), so one compiled step and one
compiled init serve every grid point, seed and label fraction of one architecture and batch size. Those
config fields are `RUNTIME_FIELDS`: train.setup reuses the jitted init and step of an earlier run of the
process that differs only in them, instead of tracing them again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from medssl_jax import augment, losses, models, optim
from medssl_jax.methods import Method
from medssl_jax.models import heads

TASKS = ("multi_label", "multi_class")


def extend_config(config) -> None:
    config.supervised = mlc.ConfigDict({
        "task": "multi_label",
        "num_labels": 1,
        "pos_weight": (),  # per label, from the train records of the run; () = 1 for every label
        "seed": 0,  # the run's seed: data order, augmentation, head init, dropout
        "peak_lr": 0.1,
        "warmup_steps": 0,
        "backbone_lr_mult": 1.0,  # encoder lr = peak_lr * this (a pretrained encoder: < 1)
        "layer_decay": 1.0,  # ViT encoders: layer-wise lr decay (BEiT/MAE); 1 = none
        "head_init": "",  # a head.npz whose columns are this store's labels (Tayebi Arasteh's in-domain arm)
        "ema_decay": 0.0,  # > 0: evaluate and keep an EMA of the weights (module docstring); 0 = the last weights
    })
    config.data.crop_ratio = (3 / 4, 4 / 3)
    config.data.flip = True


def check_config(config) -> None:
    decay = config.supervised.ema_decay
    if not 0 <= decay < 1:
        raise ValueError(f"config.supervised.ema_decay={decay!r}: must be in [0, 1) (0 = no weight averaging)")


def data_spec(config) -> dict:
    return {"sampler": "pairs", "fields": ["labels"], "seed": int(config.supervised.seed),
            "crops": [{"name": "image", "num": 1, "size": config.data.image_size,
                       "scale": tuple(config.data.crop_scale), "ratio": tuple(config.data.crop_ratio),
                       "flip": bool(config.data.flip)}]}


def build(config):
    encoder = models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype})
    return heads.Classifier(encoder, int(config.supervised.num_labels))


def init_inputs(config) -> dict:
    """What differs between the runs of a transfer study, as data: the run's seed, pos_weight and lr schedule."""
    cfg = config.supervised
    num_labels = int(cfg.num_labels)
    pos_weight = np.asarray(cfg.pos_weight or np.ones(num_labels), np.float32)
    if pos_weight.shape != (num_labels,):
        raise ValueError(f"config.supervised.pos_weight has {pos_weight.size} values for {num_labels} labels")
    schedule = optim.runtime_schedule_inputs(
        peak_lr=float(cfg.peak_lr), warmup_steps=int(cfg.warmup_steps), total_steps=int(config.total_steps),
        end_factor=float(config.optim.get("end_lr_factor", 0.0)), backbone_mult=float(cfg.backbone_lr_mult),
        layer_decay=float(cfg.layer_decay))
    inputs = {"seed": np.int32(cfg.seed), "pos_weight": pos_weight, "schedule": schedule}
    if cfg.head_init:
        with np.load(cfg.head_init) as saved:
            inputs["head"] = {"kernel": np.asarray(saved["kernel"], np.float32),
                              "bias": np.asarray(saved["bias"], np.float32)}
    return inputs


def init(model, rng, batch, config, inputs):
    image = batch["image"]
    rng = jax.random.fold_in(rng, inputs["seed"])
    variables = dict(model.init(rng, jnp.zeros((2, *image.shape[2:]), jnp.float32), train=False))
    if "head" in inputs:  # an argument of the compiled init, not a constant in it: LP-FT runs share it too
        params = dict(variables["params"])
        params["head"] = {"dense": {"kernel": inputs["head"]["kernel"], "bias": inputs["head"]["bias"]}}
        variables["params"] = params
    method_state = {"pos_weight": inputs["pos_weight"], "seed": inputs["seed"]}
    # The average's structure; its value is replaced at step 0 by the weights training starts from (the
    # restored ones after config.init or a resume), see _ema_step.
    if config.supervised.ema_decay > 0:
        method_state["ema"] = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return variables, method_state


def _ema_step(step, decay: float):
    """The weight of the old average at `step`: 0 at step 0 (the average starts at the weights config.init
    gave), then min(decay, (1 + step) / (10 + step))."""
    warm = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jnp.where(step == 0, 0.0, warm)


def _averaged(new, average, *, step, decay: float):
    return optax.incremental_update(new, average, step_size=1.0 - _ema_step(step, decay))


def init_optimizer(tx, params, inputs):
    return optim.with_runtime_schedule(tx.init(params), params, inputs["schedule"])


def loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config):
    rng = jax.random.fold_in(rng, method_state["seed"])
    aug_key, dropout_key = jax.random.split(rng)
    images = augment.augment_views(batch["image"], rng=aug_key, cfg=config.augment)[:, 0]
    labels = batch["labels"][:, 0]
    (logits, _), updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": dropout_key})
    if config.supervised.task == "multi_class":
        loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=labels))
    else:
        loss = losses.bce_with_pos_weight(logits=logits, labels=labels, pos_weight=method_state["pos_weight"])
    new_stats = updates.get("batch_stats", batch_stats)
    if "ema" in method_state:
        ema = {**method_state["ema"], "batch_stats": _averaged(new_stats, method_state["ema"]["batch_stats"], step=step,
                                                               decay=config.supervised.ema_decay)}
        method_state = {**method_state, "ema": ema}
    return loss, (new_stats, method_state, {})


def after_update(params, method_state, *, step, config):
    """The EMA of the weights follows the updated weights."""
    if "ema" not in method_state:
        return params, method_state
    ema = {**method_state["ema"], "params": _averaged(params, method_state["ema"]["params"], step=step,
                                                      decay=config.supervised.ema_decay)}
    return params, {**method_state, "ema": ema}


def evaluated_variables(params, batch_stats, method_state) -> dict:
    """The classifier a run evaluates and keeps: the EMA's with `ema_decay` > 0, else the current one."""
    if "ema" in method_state:
        return {"params": method_state["ema"]["params"], "batch_stats": method_state["ema"]["batch_stats"]}
    return {"params": params, "batch_stats": batch_stats}


def make_optimizer(config, *, total_steps: int, batch_size: int):
    del batch_size  # peak_lr is already the batch's learning rate
    cfg = config.supervised
    # The lr factors and schedule values come from init_inputs (init_optimizer writes them into the state).
    tx = optim.make_finetune_optimizer(config.optim, peak_lr=float(cfg.peak_lr), warmup_steps=int(cfg.warmup_steps),
                                       total_steps=total_steps)
    return tx, None


def export_variables(variables: dict, method_state) -> dict:
    """The whole classifier (encoder and head), the EMA's with `ema_decay` > 0: the fine-tuning code splits
    it into export + head.npz."""
    return evaluated_variables(variables["params"], variables.get("batch_stats", {}), method_state)


# Everything init_inputs turns into data; the optimiser's total_steps too (the schedule lives in its state).
RUNTIME_FIELDS = ("total_steps", "supervised.seed", "supervised.pos_weight", "supervised.peak_lr",
                  "supervised.warmup_steps", "supervised.backbone_lr_mult", "supervised.layer_decay",
                  "supervised.head_init")

METHOD = Method(data_spec=data_spec, build=build, init=init, loss_fn=loss_fn, extend_config=extend_config,
                make_optimizer=make_optimizer, init_inputs=init_inputs, init_optimizer=init_optimizer,
                export_variables=export_variables, runtime_fields=RUNTIME_FIELDS, check_config=check_config,
                after_update=after_update)
