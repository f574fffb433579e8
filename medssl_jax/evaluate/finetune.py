"""`config.mode = 'finetune'`: fine-tuning with a protocol that does not decide the result.

    python -m medssl_jax.main --config=configs/finetune.py --config.init=RUN/export --workdir=E

Every run trains through the one train loop (train.py, method 'supervised': encoder + linear head, BCE with
pos_weight from the run's train records, or softmax cross-entropy with `task='multi_class'`), so every run
checkpoints, resumes exactly after a kill and saves on SIGTERM; rerunning the same command continues an
interrupted study where it stopped (finished runs are read back, the interrupted one resumes). A run's lr,
budget, lr factors, seed and pos_weight are inputs of the compiled init and step, not constants in them
(methods/supervised.py), so every run of a study after the first gets both programs from XLA's persistent
cache instead of compiling its own init (on 2 CPU cores a 4-run grid took 25 % less time for it).

Per label fraction (nested patient subsets, identical for every init: evaluate/splits.py):
  1. grid, seed `config.seed`: learning rates `lr_grid` (per 256 images, scaled to the batch) x budgets
     `budget_grid` (warm-up `warmup_fraction`, then cosine to 0 over the budget) x, for a pretrained init,
     a lower backbone lr (`backbone_lr_mults`, ResNets) or layer-wise lr decay (`layer_decays`, ViTs), and
     LP-FT settings (`probe_head_lr_grid` x budgets: the head starts from the linear probe fit on the
     fraction's train images, C chosen on validation, E/fractions/f<F>/probe_head.npz), all of them once per
     augmentation strength of `augment_grid` ('full': the configured random-resized crop and device
     augmentation; 'flip': the whole image, only flipped); a random init trains its whole network from a
     fresh head at the grid's lr. Each run ends with its last model (no early stopping; with `ema_decay` > 0
     the moving average of its weights, which is also what is validated); its score is the mean validation
     AUC of its last `selection_evals` evaluations, which is less noisy than one reading on a small
     validation split. With `budget_top_k` = k > 0 the budgets are
     searched by successive halving: every setting runs at the shortest budget, each longer budget only the k
     best of each augmentation strength at the budget before it (the settings left out are listed in
     finetune.json, `not_promoted`);
  2. the `seed_top_k` best-scoring settings (validation only) are trained with `seeds` seeds in all, and
     the one with the best mean score over its seeds is chosen (one seed's score is a lucky draw as often as
     not: the seed that won the grid tends to score above the setting's other seeds);
  3. the test split is predicted by those models only. The largest fraction's seed-`config.seed` model is
     E/eval (what `compare` reads) and E/export; every seed's test predictions are in
     E/fractions/f<F>/seed_predictions.npz, and E/finetune.json holds the whole grid, the choice, per-seed
     test AUCs, their mean and spread. With `read_test=False` this step is skipped: E/finetune.json holds
     the grid, the choice and the seeds' validation scores, and no test prediction exists; the same command
     with `read_test=True` then reads test once, reusing every finished run.

A fraction with fewer train images than `batch_size` trains with the largest batch it fills (said in the
log), its lr scaled down with it. With `shift_store`, the selected model is also evaluated zero-shot on
that store (labels mapped by name / `label_map`, E/shift/eval); with `robustness`, on perturbed test images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import grain
import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from medssl_jax import augment, checkpoint, config_lib, jsonio, logging_lib, losses, methods, optim, sharding, train
from medssl_jax.data import pipeline
from medssl_jax.data.store import Store
from medssl_jax.evaluate import encoders, linear_probe, metrics, probe, records, robustness, workspace
from medssl_jax.evaluate import features as features_lib
from medssl_jax.methods import supervised
from medssl_jax.evaluate import splits as splits_lib
from medssl_jax.models import heads, input_norm

TASKS = ("multi_label", "multi_class")
BUDGET_UNITS = ("steps", "epochs")
# 'full': crop_scale / crop_ratio and the `augment` fields as configured; 'flip': the whole image (no random-
# resized crop, no photometric or rotation augmentation), flipped with p 0.5 when config.flip.
AUGMENT_STRENGTHS = ("full", "flip")
RESULT_FILE = "result.json"
RUN_CONFIG_FILE = "run_config.json"  # written when a run starts: an interrupted run resumes only under it


def reference_config() -> mlc.ConfigDict:
    """Every field of a fine-tuning config (configs/finetune.py and configs/dinov2_finetune.py start here)."""
    c = config_lib.eval_config()
    c.mode = "finetune"
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 500
    # Host-side geometry: random-resized crop (scale, aspect ratio) of each image, then flip p 0.5.
    # crop_scale (1.0, 1.0) with crop_ratio (1.0, 1.0) is the centre square crop alone (no crop augmentation).
    c.crop_scale = (0.08, 1.0)
    c.crop_ratio = (3 / 4, 4 / 3)
    c.flip = True
    # Device-side photometric augmentation + rotation (medssl_jax/augment.py fields).
    c.augment = augment.preset("azizi_cxr")
    # SGD with Nesterov momentum (SimCLR's and Kornblith et al.'s transfer recipe) or AdamW (ViTs); the lr
    # comes from lr_grid, the schedule is always warm-up + cosine over the budget.
    c.optim = optim.default_config("sgd")
    c.optim.nesterov = True
    c.optim.weight_decay = 0.0
    # The protocol (module docstring): every init gets its own setting, chosen on validation.
    c.lr_grid = (0.01, 0.03, 0.1)  # base learning rates (per 256 images with optim.lr_scaling='linear')
    c.budget_grid = (1000,)  # training lengths to choose from, in `budget_unit`
    c.budget_unit = "steps"  # 'steps', or 'epochs' over the whole train split (the same steps at every fraction)
    c.backbone_lr_mults = (1.0, 0.1)  # pretrained ResNet encoders: encoder lr = lr x this; random init: 1
    c.layer_decays = (1.0, 0.75)  # pretrained ViT encoders: layer-wise lr decay (MAE/BEiT); random init: 1
    # Augmentation strengths tried for every setting (AUGMENT_STRENGTHS): how much augmentation helps depends
    # on the init and the number of labels (BreastMNIST, validation: random init at 10 % labels scored 0.11
    # higher with 'full' than with 'flip', a SimCLR export at 10 % and 100 % 0.04 higher with 'flip').
    c.augment_grid = ("full",)
    # LP-FT (Kumar et al. 2022) for a pretrained encoder: settings whose head starts from the linear probe fit
    # on the fraction's train images (C chosen on validation), the whole network then fine-tuned at one of
    # these (small) lrs. A fresh head needs an lr large enough to learn it, and at such an lr a few dozen
    # labelled images pull the pretrained features away; LP-FT reaches lrs that stay near the probe. () = none.
    c.probe_head_lr_grid = ()
    # Successive halving over budget_grid: every setting (lr x backbone lr / decay x head) trains at the shortest
    # budget, and each longer budget only the `budget_top_k` best of the budget before it (validation scores);
    # 0 = every setting at every budget. The long runs are most of a grid's cost; replayed on BreastMNIST's
    # full grids (1 / 10 / 25 %), k = 2 chose the full grid's setting in 5 of 6 cells (BENCHMARKS.md).
    c.budget_top_k = 0
    c.warmup_fraction = 0.1
    c.eval_every = -1  # steps between validation evaluations; -1 = a tenth of the budget
    c.selection_evals = 3  # a setting's score: mean validation AUC of its last N evaluations
    c.seeds = 3  # runs of the chosen setting (seeds config.seed, +1, ...)
    # The `seed_top_k` best settings of the grid (seed config.seed's validation scores) each run with all
    # `seeds` seeds, and the choice is the best mean score over the seeds: one seed's score overstates the
    # setting it picks (BreastMNIST, 8 arm x fraction cells: the chosen setting's other two seeds scored
    # 0.045 lower on validation on average, 0.12 at most, lower in 6 of 8), and the finalists are compared on
    # three runs each. 1 = the best single-seed score, then its other seeds.
    c.seed_top_k = 2
    # > 0: every run evaluates and keeps an exponential moving average of its weights (methods/supervised.py),
    # not its last weights; 0 = the last weights.
    c.ema_decay = 0.0
    # Distribution shift: evaluate the selected model on another store (labels mapped by name, plus
    # `label_map` pairs (shift-store label, model label) for names that differ).
    c.shift_store = ""
    c.shift_split = "test"
    c.label_map = ()
    c.save_model = True  # write the selected model (seed config.seed) to E/export (+ head.npz)
    # Whole-model transfer from a fine-tune on another store (Tayebi Arasteh et al.'s in-domain supervised
    # arm): config.init is that run's E/export, and the head rows of the labels its head.npz also has
    # (matched by name, case-insensitive) start from it; the other rows start fresh.
    c.init_head = False
    # 'multi_label': sigmoid + BCE with pos_weight (chest X-rays); 'multi_class': softmax cross-entropy over
    # one-hot label columns (Azizi et al.'s dermatology task), scored by top-1 accuracy and the macro
    # one-vs-rest AUC (the mean AUC of the one-hot columns).
    c.task = "multi_label"
    return c


def validate(config) -> None:
    """The protocol's fields, checked before any work (one line naming the field)."""
    def need(ok, field, rule):
        if not ok:
            raise ValueError(f"config.{field}={config[field]!r}: {rule}")

    need(len(config.lr_grid) > 0 and all(float(v) > 0 for v in config.lr_grid), "lr_grid", "needs values > 0")
    need(len(config.budget_grid) > 0 and all(float(v) > 0 for v in config.budget_grid), "budget_grid",
         "needs values > 0")
    need(config.budget_unit in BUDGET_UNITS, "budget_unit", f"is not one of {list(BUDGET_UNITS)}")
    need(len(config.backbone_lr_mults) > 0 and all(float(v) > 0 for v in config.backbone_lr_mults),
         "backbone_lr_mults", "needs values > 0")
    need(len(config.augment_grid) > 0 and all(v in AUGMENT_STRENGTHS for v in config.augment_grid)
         and len(set(config.augment_grid)) == len(config.augment_grid), "augment_grid",
         f"needs distinct values from {list(AUGMENT_STRENGTHS)}")
    need(len(config.layer_decays) > 0 and all(0 < float(v) <= 1 for v in config.layer_decays), "layer_decays",
         "needs values in (0, 1]")
    need(all(float(v) > 0 for v in config.probe_head_lr_grid), "probe_head_lr_grid",
         "needs values > 0 (or () for none)")
    need(not (config.probe_head_lr_grid and config.init_head), "probe_head_lr_grid",
         "starts the head from a linear probe, config.init_head=True from the init's head.npz: set only one "
         "(--config.probe_head_lr_grid=\"()\")")
    need(isinstance(config.budget_top_k, int) and config.budget_top_k >= 0, "budget_top_k",
         "must be an integer >= 1 (or 0: every setting at every budget)")
    need(0 <= config.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
    need(config.eval_every == -1 or config.eval_every >= 1, "eval_every", "must be >= 1 (or -1: a tenth of the budget)")
    need(config.selection_evals >= 1, "selection_evals", "must be >= 1")
    need(config.seeds >= 1, "seeds", "must be >= 1")
    need(isinstance(config.seed_top_k, int) and config.seed_top_k >= 1, "seed_top_k", "must be an integer >= 1")
    need(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = no weight averaging)")
    need(config.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    need(config.optim.name in optim.FINETUNE_OPTIMIZERS, "optim", f"name must be one of {optim.FINETUNE_OPTIMIZERS}")


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


# ------------------------------------------------------------------------------------------ the grid

@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    lr: float  # base lr (per 256 images with linear scaling)
    budget: int  # steps
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    head: str = "fresh"  # 'fresh' (N(0, 0.01)) or 'probe' (LP-FT: the fraction's linear probe)
    augment: str = "full"  # AUGMENT_STRENGTHS

    @property
    def name(self) -> str:
        name = f"lr{self.lr:g}_steps{self.budget}"
        if self.backbone_lr_mult != 1:
            name += f"_bb{self.backbone_lr_mult:g}"
        if self.layer_decay != 1:
            name += f"_ld{self.layer_decay:g}"
        if self.head == "probe":
            name += "_lpft"
        if self.augment != "full":
            name += f"_{self.augment}"
        return name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid(config, *, pretrained: bool, is_vit: bool, budgets: list[int]) -> list[Setting]:
    """The settings an init is tuned over: lrs x budgets, and for a pretrained encoder x backbone lr
    multipliers (ResNets) or layer-wise decays (ViTs), then its LP-FT settings (`probe_head_lr_grid` x
    budgets, one lr for the whole network as in Kumar et al.); all of them once per `augment_grid` strength."""
    extra = [1.0]
    if pretrained:
        extra = [float(v) for v in (config.layer_decays if is_vit else config.backbone_lr_mults)]
    out = []
    for strength in config.augment_grid:
        for lr in config.lr_grid:
            for budget in budgets:
                for value in extra:
                    out.append(Setting(float(lr), int(budget), augment=str(strength),
                                       **({"layer_decay": value} if is_vit else {"backbone_lr_mult": value})))
        if pretrained:
            out += [Setting(float(lr), int(budget), head="probe", augment=str(strength))
                    for lr in config.probe_head_lr_grid for budget in budgets]
    return out


def promoted(settings: list[Setting], scores: dict[str, float], *, budget: int, top_k: int) -> list[Setting]:
    """Successive halving: the `top_k` best-scoring of `settings` (one budget's runs; a failed run, score
    -inf, never) of each augmentation strength, moved to the longer `budget`, in grid order; ties go to the
    earlier setting. Per strength, because augmentation changes how a score grows with the budget: on
    BreastMNIST random init at 100 % labels scored 0.870 with flips only and 0.884 with the full
    augmentation after 300 steps, but 0.935 and 0.891 after 1000 (lr 1, validation)."""
    best = set()
    for strength in dict.fromkeys(s.augment for s in settings):
        best.update(finalists(scores, [s.name for s in settings if s.augment == strength], top_k))
    return [dataclasses.replace(s, budget=int(budget)) for s in settings if s.name in best]


def selection_score(val_auc: list, window: int) -> float:
    """Mean of the last `window` defined validation AUCs (-inf when none is defined)."""
    values = [v for v in val_auc if v is not None and np.isfinite(v)][-window:]
    return float(np.mean(values)) if values else -np.inf


def choose(scores: dict[str, float], order: list[str]) -> str:
    """The best-scoring setting name; ties go to the earlier one in grid order."""
    return max(order, key=lambda name: (scores[name], -order.index(name)))


def finalists(scores: dict[str, float], order: list[str], top_k: int) -> list[str]:
    """The `top_k` best-scoring setting names (a failed run, score -inf, never), best first; ties go to
    the earlier one in grid order."""
    finite = [name for name in order if np.isfinite(scores[name])]
    return sorted(finite, key=lambda name: (-scores[name], order.index(name)))[:top_k]


def seed_mean_score(seed_scores: list[float]) -> float:
    """A finalist's score over its seeds: the mean, -inf when a seed failed or had no defined validation
    AUC (a setting that diverges for some seeds is not chosen over one that trains for all)."""
    return float(np.mean(seed_scores)) if all(np.isfinite(seed_scores)) else -np.inf


def budgets_in_steps(config, *, num_train: int) -> list[int]:
    if config.budget_unit == "steps":
        return [int(b) for b in config.budget_grid]
    return [max(1, int(np.ceil(float(b) * num_train / config.batch_size))) for b in config.budget_grid]


# ------------------------------------------------------------------------------------------ one run

def pos_weight_for(labels: np.ndarray, label_names) -> tuple[np.ndarray, list[str]]:
    """(N - P) / P per label from the train labels; a label without positives gets weight 1 (and is named)."""
    present = np.nansum(labels, axis=0) > 0
    weight = np.ones(labels.shape[1], np.float32)
    if present.any():
        weight[present] = losses.pos_weight_from_labels(labels[:, present])
    return weight, [label_names[j] for j in np.flatnonzero(~present)]


def fitted_batch(batch_size: int, num_train: int, num_devices: int) -> int:
    """The batch a fraction trains with: config.batch_size, or the largest multiple of the device count
    that the fraction's images fill."""
    if num_train >= batch_size:
        return batch_size
    fitted = num_train - num_train % num_devices
    if fitted < num_devices:
        raise FinetuneError(f"{num_train} train images cannot fill a batch of one image per device "
                            f"({num_devices} devices): use a larger label fraction")
    return fitted


@dataclasses.dataclass
class Context:
    """What every run of one evaluation shares: the store, splits, the init's model, the prediction step."""

    config: Any
    store: Store
    splits: splits_lib.Splits
    mesh: Any
    encoder: encoders.Encoder
    channels: int
    model: Any  # heads.Classifier
    predict_fn: Any
    head_init: str  # '' or E/head_init.npz


def run_config(ctx: Context, setting: Setting, *, seed: int, batch_size: int, pos_weight, warmup: int,
               head_init: str | None = None):
    """The train-loop config (method 'supervised') of one run; `head_init`: the head.npz it starts from
    (default: the study's, `ctx.head_init`)."""
    config = ctx.config
    c = config_lib.pretrain_config()
    methods.get("supervised").extend_config(c)
    c.method = "supervised"
    c.seed = int(config.seed)  # the loop's key; the run's own seed is supervised.seed (runtime data)
    c.init = "" if config.init == "random" else config.init
    c.batch_size = batch_size
    c.total_steps = setting.budget
    c.compute_dtype = config.compute_dtype
    c.mesh = config.mesh
    c.sharding_rules = config.sharding_rules
    c.data.update({k: config.data[k] for k in ("store", "cache_dir", "phantom_patients", "phantom_size",
                                               "phantom_seed", "num_workers")})
    c.data.image_size = config.image_size
    c.data.crop_scale = tuple(config.crop_scale)
    c.data.crop_ratio = tuple(config.crop_ratio)
    c.data.flip = bool(config.flip)
    c.augment = config.augment
    if setting.augment == "flip":
        c.data.crop_scale, c.data.crop_ratio = (1.0, 1.0), (1.0, 1.0)
        c.augment = augment.preset("none")
    c.model = mlc.ConfigDict(ctx.encoder.model_config)
    c.optim = mlc.ConfigDict(config.optim.to_dict())
    c.log_every = config.log_every
    c.checkpoint_every = config.checkpoint_every
    c.keep_checkpoints = 1
    c.probe.enabled = False
    c.monitor.every = 0  # the evaluator scores validation AUC; the SSL monitor is for pretraining
    c.supervised.update(task=config.task, num_labels=len(ctx.store.label_names), pos_weight=tuple(pos_weight),
                        seed=int(seed), peak_lr=optim.scaled_lr(mlc.ConfigDict({**config.optim.to_dict(),
                                                                                 "base_lr": setting.lr}), batch_size),
                        warmup_steps=warmup, backbone_lr_mult=setting.backbone_lr_mult,
                        layer_decay=setting.layer_decay,
                        head_init=ctx.head_init if head_init is None else head_init,
                        ema_decay=float(config.ema_decay))
    return c


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


def _predict(ctx: Context, variables, ids, store: Store | None = None):
    config = ctx.config
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables)):
        variables = sharding.replicate(variables, ctx.mesh)  # host arrays (a saved model): placed once
    batch = max(ctx.mesh.devices.size, min(config.batch_size, 256) // ctx.mesh.devices.size * ctx.mesh.devices.size)
    return predict(ctx.predict_fn, variables, store or ctx.store, ids, image_size=config.image_size,
                   batch_size=batch, mesh=ctx.mesh, channels=ctx.channels)


def _val_auc(ctx: Context, variables) -> float | None:
    probs, labels = _predict(ctx, variables, ctx.splits.val)
    if not np.all(np.isfinite(probs)):  # the loss can stay finite while BatchNorm's statistics overflow
        raise train.TrainingError("non-finite predictions on the validation split (the model diverged)")
    return metrics.evaluate_predictions(probs=probs, labels=labels, label_names=list(ctx.store.label_names))["mean_auc"]


def _read_curve(run_dir: str) -> dict:
    steps, values = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "val_mean_auc" in row:
                steps.append(int(row["step"]))
                values.append(None if not np.isfinite(row["val_mean_auc"]) else float(row["val_mean_auc"]))
    return {"steps": steps, "val_auc": values}


def _save_model(directory: str, variables: dict, ctx: Context, *, steps: int) -> None:
    """E/export layout: the encoder as an export (usable as --config.init) + head.npz."""
    encoder = methods.encoder_variables(variables)
    config = ctx.config
    checkpoint.save_export(
        directory, encoder,
        {"model": ctx.encoder.model_config,
         "input": {"image_size": config.image_size, "channels": ctx.channels,
                   "normalization": input_norm.recorded(ctx.encoder.model_config)},
         "source": {"method": "finetune", "init": config.init, "init_method": ctx.encoder.method,
                    "store": ctx.store.name, "steps": steps, "label_names": list(ctx.store.label_names)}})
    if jax.process_index() == 0:
        head = variables["params"]["head"]["dense"]
        tmp = os.path.join(directory, "head.tmp.npz")
        np.savez(tmp, kernel=np.asarray(head["kernel"]), bias=np.asarray(head["bias"]),
                 label_names=np.asarray(list(ctx.store.label_names)))
        os.replace(tmp, os.path.join(directory, "head.npz"))


def load_model(directory: str) -> dict:
    """The variables of a model `_save_model` wrote (encoder export + head.npz), as the Classifier's."""
    encoder, _ = checkpoint.load_export(directory)
    with np.load(os.path.join(directory, "head.npz")) as head:
        dense = {"kernel": head["kernel"], "bias": head["bias"]}
    out = {collection: {"encoder": tree} for collection, tree in encoder.items()}
    out.setdefault("params", {})["head"] = {"dense": dense}
    out.setdefault("batch_stats", {})
    return out


def train_run(ctx: Context, setting: Setting, *, seed: int, train_ids: np.ndarray, run_dir: str,
              batch_size: int, pos_weight, stop_after: int | None = None, head_init: str | None = None) -> dict | None:
    """Trains (or resumes, or reads back) one run through the train loop; returns its result record
    ({"setting", "seed", "curve", "score", "val_auc", "steps"}) or None when it was stopped early."""
    path = os.path.join(run_dir, RESULT_FILE)
    config = ctx.config
    warmup = int(round(config.warmup_fraction * setting.budget))
    cfg = run_config(ctx, setting, seed=seed, batch_size=batch_size, pos_weight=pos_weight, warmup=warmup,
                     head_init=head_init)
    identity = run_identity(cfg, run_dir)
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        check_same_run(record.get("config"), identity, run_dir)
        return record
    identity_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    if os.path.exists(identity_path):  # an interrupted run resumes only under the config it started with
        with open(identity_path) as f:
            check_same_run(json.load(f), identity, run_dir)
    elif jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        jsonio.write_json(identity_path, identity)
    every = config.eval_every if config.eval_every > 0 else max(1, setting.budget // 10)
    evaluator = train.Evaluator(every=every, fn=lambda state: {"val_mean_auc": _nan_if_none(_val_auc(
        ctx, supervised.evaluated_variables(state["params"], state["batch_stats"], state["method_state"])))})
    logging_lib.log(f"run {setting.name} seed {seed}: {setting.budget} steps of {batch_size}, peak lr "
                    f"{cfg.supervised.peak_lr:.4g}, warm-up {warmup}, validation every {every} steps -> {run_dir}")
    try:
        result = train.pretrain(cfg, run_dir, store=ctx.store, ids=train_ids, evaluator=evaluator, export=False,
                                stop_after=stop_after)
    except train.TrainingError as error:  # a diverged grid point is a result (the lr is too high), not a crash
        logging_lib.log(f"run {setting.name} seed {seed} failed: {error}")
        record = {"setting": setting.to_dict(), "name": setting.name, "seed": int(seed), "curve": _read_curve(run_dir),
                  "score": None, "val_auc": None, "steps": None, "failed": str(error).splitlines()[0],
                  "config": identity}
        if jax.process_index() == 0:
            jsonio.write_json(path, record)
        return record
    if result.variables is None:
        return None
    _save_model(os.path.join(run_dir, "model"), result.variables, ctx, steps=result.steps_done)
    curve = _read_curve(run_dir)
    record = {"setting": setting.to_dict(), "name": setting.name, "seed": int(seed), "curve": curve,
              "score": _finite_or_none(selection_score(curve["val_auc"], config.selection_evals)),
              "val_auc": curve["val_auc"][-1] if curve["val_auc"] else None, "steps": result.steps_done,
              "batch_size": batch_size, "peak_lr": float(cfg.supervised.peak_lr), "config": identity}
    if jax.process_index() == 0:
        jsonio.write_json(path, record)
        # The finished run's model is in run_dir/model; its checkpoints only served resumption.
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    multihost_utils.sync_global_devices(f"finetune run {run_dir}")
    return record


# Fields of a run's config that do not change what it trains (logging, checkpoint cadence, input workers).
_NOT_IDENTITY = ("log_every", "checkpoint_every", "keep_checkpoints", "data.num_workers", "data.cache_dir")


def run_identity(cfg, run_dir: str) -> dict:
    """What determines one run's result: its train-loop config, flattened, without `_NOT_IDENTITY` and
    with the head-init path relative to the run (a study directory moved elsewhere still matches)."""
    flat = _flatten(records.json_value(cfg.to_dict()))
    for key in _NOT_IDENTITY:
        flat.pop(key, None)
    if flat.get("supervised.head_init"):
        flat["supervised.head_init"] = os.path.relpath(flat["supervised.head_init"], run_dir)
    return flat


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Run-config fields added after runs were first written, with the value that trains as the code before them
# did: a run stored without such a field was trained with that value, so a study keeps its finished runs.
_ADDED_FIELDS = {"supervised.ema_decay": 0.0, "model.cifar_stem": False}


def check_same_run(stored: dict | None, current: dict, run_dir: str) -> None:
    """A finished or interrupted run is reused only if it was trained with the config this study would use
    now; otherwise a one-line FinetuneError names the first differing fields (never silently mixed)."""
    if stored is None:
        raise FinetuneError(f"{run_dir}: a run written without its config (an older medssl_jax); cannot tell "
                            "whether it matches this study's settings: rerun with a new --workdir")
    # A field missing on either side (an older run, or an older export's model config) means its old behaviour.
    stored, current = {**_ADDED_FIELDS, **stored}, {**_ADDED_FIELDS, **current}
    differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in differ[:3])
        more = f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
        raise FinetuneError(f"{run_dir} was trained with another config ({shown}{more}): use a new --workdir, "
                            "or rerun with the settings it was started with")


def _nan_if_none(value):
    return np.nan if value is None else value


# ------------------------------------------------------------------------------------------ LP-FT

PROBE_HEAD_FILE = "probe_head.npz"


def fit_probe_head(ctx: Context, fraction: float, train_ids: np.ndarray, *, out_dir: str, cache_dir: str) -> dict:
    """The LP-FT head of one fraction: the linear probe (evaluate/probe.py, C from its grid chosen on the
    validation split) on the encoder's pooled features of the fraction's train images, folded into the
    classifier head's kernel and bias and written to out_dir/probe_head.npz; read back when it exists.
    Returns {"path", "c", "val_mean_auc"}."""
    path = os.path.join(out_dir, PROBE_HEAD_FILE)
    config, splits, label_names = ctx.config, ctx.splits, list(ctx.store.label_names)
    # What the head is a function of: the encoder's weights, the store, the image size and the splits.
    features_config = mlc.ConfigDict({"init": config.init, "seed": config.seed, "feature": "pre_logits",
                                      "image_size": config.image_size, "compute_dtype": config.compute_dtype,
                                      "batch_size": min(config.batch_size, 256)})
    features_key = linear_probe.feature_cache_key(features_config, ctx.encoder,
                                                  records.store_fingerprint(ctx.store.path))
    key = f"{features_key}/{splits.checksum}"
    if os.path.exists(path):
        with np.load(path) as saved:
            if str(saved["key"]) == key:
                return {"path": path, "c": float(saved["c"]),
                        "val_mean_auc": _finite_or_none(float(saved["val_mean_auc"]))}
    features, labels, rows = linear_probe.features_of(
        ctx.encoder, ctx.store, splits, features_config, mesh=ctx.mesh, roles=("train", "val"),
        forward=features_lib.feature_fn(ctx.encoder.model, "pre_logits", ctx.mesh),
        cache_dir=os.path.join(cache_dir, features_key))
    train_rows, val_rows = ([rows[int(i)] for i in ids] for ids in (train_ids, splits.val))
    fitted, c, by_c = probe.select_and_fit(features[train_rows], labels[train_rows], features[val_rows],
                                           labels[val_rows], c_grid=probe.C_GRID, label_names=label_names)
    kernel, bias = fitted.as_dense()
    val_auc = _finite_or_none(by_c[c])
    logging_lib.log(f"label fraction {fraction:g}: LP-FT head = the linear probe on {len(train_ids)} train images "
                    f"(C={c:g}, validation mean AUC {metrics.fmt_auc(val_auc)}) -> {path}")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, "probe_head.tmp.npz")
        np.savez(tmp, kernel=kernel, bias=bias, label_names=np.asarray(label_names), c=np.float64(c),
                 val_mean_auc=np.float64(np.nan if val_auc is None else val_auc), key=np.asarray(key))
        os.replace(tmp, path)
    multihost_utils.sync_global_devices(f"probe head {path}")
    return {"path": path, "c": c, "val_mean_auc": val_auc}


# ------------------------------------------------------------------------------------------ a fraction

def fine_tune_fraction(ctx: Context, fraction: float, *, workdir: str, stop_after: int | None = None) -> dict | None:
    """The protocol of the module docstring on one label fraction; None if interrupted (`stop_after`)."""
    config, store = ctx.config, ctx.store
    label_names = list(store.label_names)
    train_ids = ctx.splits.fraction_ids(fraction)
    pos_weight, no_positive = pos_weight_for(store.labels[train_ids], label_names)
    if no_positive:
        logging_lib.log(f"label fraction {fraction:g}: no positive train example for {no_positive} (pos_weight 1)")
    batch_size = fitted_batch(config.batch_size, len(train_ids), ctx.mesh.devices.size)
    if batch_size != config.batch_size:
        logging_lib.log(f"label fraction {fraction:g}: {len(train_ids)} train images, fewer than the batch of "
                        f"{config.batch_size}: training with batches of {batch_size} (lr scaled with the batch)")
    pretrained = config.init != "random"
    is_vit = ctx.encoder.model_config.get("name") == "vit"
    budgets = budgets_in_steps(config, num_train=len(ctx.splits.train))
    full_grid = grid(config, pretrained=pretrained, is_vit=is_vit, budgets=budgets)
    ordered_budgets = sorted({s.budget for s in full_grid})
    halving = config.budget_top_k > 0 and len(ordered_budgets) > 1
    root = os.path.join(workdir, "runs", f"f{fraction:g}")
    stage = [s for s in full_grid if s.budget == ordered_budgets[0]] if halving else full_grid
    search = (f"{len(stage)} settings for {ordered_budgets[0]} steps, the best {config.budget_top_k} of each budget "
              f"(validation) again for the next of {ordered_budgets[1:]} steps" if halving
              else f"{len(full_grid)} settings on validation")
    logging_lib.log(f"label fraction {fraction:g} ({len(train_ids)} train images): {search}, then {config.seeds} "
                    f"seeds of each of the best {config.seed_top_k}, chosen by their mean score")

    probe_head = None
    if any(s.head == "probe" for s in full_grid):
        probe_head = fit_probe_head(ctx, fraction, train_ids, cache_dir=os.path.join(workdir, "cache"),
                                    out_dir=os.path.join(workdir, "fractions", f"f{fraction:g}"))

    def one(setting, seed):
        return train_run(ctx, setting, seed=seed, train_ids=train_ids, batch_size=batch_size, pos_weight=pos_weight,
                         run_dir=os.path.join(root, setting.name, f"seed{seed}"), stop_after=stop_after,
                         head_init=probe_head["path"] if setting.head == "probe" else None)

    grid_results, settings = {}, []
    for budget in [None] + (ordered_budgets[1:] if halving else []):
        if budget is not None:
            stage = promoted(stage, {s.name: _score_of(grid_results[s.name]) for s in stage}, budget=budget,
                             top_k=config.budget_top_k)
        for setting in stage:
            result = one(setting, config.seed)
            if result is None:
                return None
            grid_results[setting.name] = result
            settings.append(setting)
    scores = {s.name: _score_of(grid_results[s.name]) for s in settings}
    if not any(np.isfinite(v) for v in scores.values()):
        raise FinetuneError(f"label fraction {fraction:g}: no setting of the grid trained (every run failed or had no "
                            f"defined validation AUC); see {root}")
    logging_lib.log(f"label fraction {fraction:g}: validation scores (seed {config.seed}) "
                    + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()))
    by_name = {s.name: s for s in settings}
    final = finalists(scores, [s.name for s in settings], config.seed_top_k)
    seed_runs = {}
    for name in final:
        seed_runs[name] = [grid_results[name]]
        for k in range(1, config.seeds):
            result = one(by_name[name], config.seed + k)
            if result is None:
                return None
            seed_runs[name].append(result)
    final_scores = {name: seed_mean_score([_score_of(r) for r in seed_runs[name]]) for name in final}
    # Every finalist failed for some seed: the best single-seed score, its failed seeds reported below.
    chosen_name = choose(final_scores, final) if any(np.isfinite(v) for v in final_scores.values()) else final[0]
    chosen = by_name[chosen_name]
    logging_lib.log(f"label fraction {fraction:g}: chose {chosen_name} (mean validation score over seeds "
                    + ", ".join(f"{n} {final_scores[n]:.4f}" for n in final) + ")")
    lr_field = "probe_head_lr_grid" if chosen.head == "probe" else "lr_grid"
    lrs = sorted(float(v) for v in config[lr_field])
    at_edge = len(lrs) > 1 and chosen.lr in (lrs[0], lrs[-1])
    if at_edge:
        logging_lib.log(f"warning: label fraction {fraction:g}: the chosen lr {chosen.lr:g} is at an end of "
                        f"config.{lr_field} {tuple(lrs)}; the best lr may lie outside it (widen the grid)")
    seed_results, failed_seeds = [grid_results[chosen_name]], {}
    for result in seed_runs[chosen_name][1:]:
        if result.get("failed"):  # reported, and left out of the mean (never silently)
            logging_lib.log(f"warning: label fraction {fraction:g}: seed {result['seed']} of {chosen_name} failed: "
                            f"{result['failed']}")
            failed_seeds[result["seed"]] = result["failed"]
            continue
        seed_results.append(result)

    curves = [r["curve"] for r in seed_results]
    steps = curves[0]["steps"]
    mean_curve = [_mean_or_none([c["val_auc"][i] for c in curves if i < len(c["val_auc"])]) for i in range(len(steps))]
    models = [os.path.join(root, chosen_name, f"seed{r['seed']}", "model") for r in seed_results]
    summary = {
        "fraction": fraction, "num_train": int(len(train_ids)), "batch_size": int(batch_size),
        "pos_weight": [float(w) for w in pos_weight],
        "grid": [{**grid_results[s.name]["setting"], "name": s.name, "score": _finite_or_none(scores[s.name]),
                  "final_val_auc": grid_results[s.name]["val_auc"], "curve": grid_results[s.name]["curve"]}
                 for s in settings],
        "chosen": {**chosen.to_dict(), "name": chosen_name, "score": _finite_or_none(final_scores[chosen_name]),
                   "grid_score": scores[chosen_name], "lr_at_grid_edge": at_edge},
        "seed_top_k": int(config.seed_top_k),
        "finalists": [{"name": n, "score": _finite_or_none(final_scores[n]),
                       "seed_scores": [_finite_or_none(_score_of(r)) for r in seed_runs[n]]} for n in final],
        "budget_top_k": int(config.budget_top_k),
        "not_promoted": [s.name for s in full_grid if s.name not in grid_results],
        "probe_head": None if probe_head is None else {k: v for k, v in probe_head.items() if k != "path"},
        "failed": {n: r["failed"] for n, r in grid_results.items() if r.get("failed")},
        "failed_seeds": failed_seeds,
        "seeds": [{"seed": r["seed"], "final_val_auc": r["val_auc"]} for r in seed_results],
        "test_mean_auc": None,
        "test_mean_auc_spread": None,
        "val_curve": {"steps": steps, "val_auc": mean_curve},
        "read_test": bool(config.read_test),
    }
    if not config.read_test:
        logging_lib.log(f"label fraction {fraction:g}: validation only (config.read_test=False): {chosen_name}, "
                        f"seed-mean validation score {metrics.fmt_auc(summary['chosen']['score'])}; the test split "
                        "was not read")
        return {**summary, "model_dir": models[0]}

    # The test split, for the chosen setting's models only.
    test_probs = []
    for i, model_dir in enumerate(models):
        variables = load_model(model_dir)
        probs, test_labels = _predict(ctx, variables, ctx.splits.test)
        test_probs.append(probs)
        if i == 0:  # the decision thresholds come from the first seed's model on validation
            val_probs, val_labels = _predict(ctx, variables, ctx.splits.val)
    per_seed = [metrics.evaluate_predictions(probs=p, labels=test_labels, label_names=label_names)["mean_auc"]
                for p in test_probs]
    defined = [a for a in per_seed if a is not None]
    for entry, auc in zip(summary["seeds"], per_seed):
        entry["test_mean_auc"] = auc
    summary["test_mean_auc"] = float(np.mean(defined)) if defined else None
    summary["test_mean_auc_spread"] = float(np.max(defined) - np.min(defined)) if defined else None
    logging_lib.log(f"label fraction {fraction:g}: test mean AUC per seed "
                    + ", ".join(metrics.fmt_auc(a) for a in per_seed)
                    + f"; mean {metrics.fmt_auc(summary['test_mean_auc'])}, spread "
                    + (f"{summary['test_mean_auc_spread']:.4f}" if defined else "n/a"))
    out = os.path.join(workdir, "fractions", f"f{fraction:g}")
    os.makedirs(out, exist_ok=True)
    if jax.process_index() == 0:
        tmp = os.path.join(out, "seed_predictions.tmp.npz")
        np.savez(tmp, probs=np.stack(test_probs).astype(np.float32), labels=test_labels.astype(np.float32),
                 record_ids=np.asarray(ctx.splits.test, np.int64), seeds=np.array([r["seed"] for r in seed_results]))
        os.replace(tmp, os.path.join(out, "seed_predictions.npz"))
    return {**summary, "test_probs": test_probs, "test_labels": test_labels, "model_dir": models[0],
            "thresholds": metrics.youden_thresholds(val_probs, val_labels)}


def _score_of(result: dict) -> float:
    return -np.inf if result["score"] is None else result["score"]


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def read_seed_predictions(workdir: str, fraction: float) -> dict:
    """{"probs": [S, N, L], "labels", "record_ids", "seeds"} of a finished fraction."""
    with np.load(os.path.join(workdir, "fractions", f"f{fraction:g}", "seed_predictions.npz")) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------ run

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


def _head_init(config, workdir: str, encoder: encoders.Encoder, model, channels: int, label_names) -> str:
    """config.init_head: the init's head.npz with its columns moved to this store's labels, as a file the
    runs start from ('' without init_head)."""
    if not config.init_head:
        return ""
    path = os.path.join(config.init, "head.npz")
    if config.init == "random" or not os.path.isfile(path):
        raise FinetuneError(f"config.init_head=True needs config.init to be a fine-tune's export with head.npz "
                            f"(E/export); {config.init!r} has none")
    example = np.zeros((1, config.image_size, config.image_size, channels), np.float32)
    fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))["params"]["head"]["dense"]
    with np.load(path) as saved:
        kernel, bias, moved = aligned_head(np.zeros(fresh["kernel"].shape, np.float32),
                                           np.zeros(fresh["bias"].shape, np.float32), label_names,
                                           {k: saved[k] for k in ("kernel", "bias", "label_names")})
    # Labels the saved head lacks start like a fresh head: N(0, 0.01) kernel, zero bias.
    rng = np.random.default_rng(config.seed)
    for column, name in enumerate(label_names):
        if name not in moved:
            kernel[:, column] = rng.normal(0, 0.01, kernel.shape[0])
    fresh = [n for n in label_names if n not in moved]
    logging_lib.log(f"head initialised from {path} for {moved or 'no label'}" + (f"; fresh for {fresh}" if fresh else ""))
    out = os.path.join(workdir, "head_init.npz")
    if jax.process_index() == 0:
        np.savez(out + ".tmp.npz", kernel=kernel, bias=bias, label_names=np.asarray(label_names))
        os.replace(out + ".tmp.npz", out)
    return out


def open_context(config, workdir: str, *, store: Store | None = None):
    """(workdir, context, fractions, fingerprint) after every check that can fail before training."""
    validate(config)
    workdir, mesh, store = workspace.open_eval(config, workdir, store=store)
    _check_task(config, store)
    fractions = splits_lib.check_fractions(config.label_fractions)
    splits = splits_lib.resolve(workdir, store, config.splits, fractions)
    logging_lib.log(splits_lib.describe(splits, store))
    channels = store.channels(splits.test)
    encoder = encoders.load_encoder(config, channels=channels)
    model = heads.Classifier(encoder.model, len(store.label_names))
    multi_class = config.task == "multi_class"
    activation = jax.nn.softmax if multi_class else jax.nn.sigmoid
    predict_fn = jax.jit(lambda v, x: activation(model.apply(v, augment.to_unit(x), train=False)[0]))
    head_init = _head_init(config, workdir, encoder, model, channels, list(store.label_names))
    ctx = Context(config=config, store=store, splits=splits, mesh=mesh, encoder=encoder, channels=channels,
                  model=model, predict_fn=predict_fn, head_init=head_init)
    return workdir, ctx, fractions, records.store_fingerprint(store.path)


def run(config, workdir: str, *, stop_after: int | None = None, store: Store | None = None) -> dict | None:
    """Runs the protocol of the module docstring; returns E/eval/summary.json's dict (E/finetune.json's with
    `read_test=False`; None if `stop_after`,
    a test hook that stops each run after that many steps like a preemption, interrupted it). `store`:
    config.data's store when the caller has it open."""
    workdir, ctx, fractions, fingerprint = open_context(config, workdir, store=store)
    shift = _open_shift(config, ctx.store)  # fail on a bad shift store / label map before training
    store, label_names = ctx.store, list(ctx.store.label_names)
    name = config.name or os.path.basename(workdir)

    results, entries = {}, []
    for fraction in fractions:
        result = fine_tune_fraction(ctx, fraction, workdir=workdir, stop_after=stop_after)
        if result is None:
            logging_lib.log("stopped; rerun the same command to resume")
            return None
        results[fraction] = result
        if not config.read_test:
            continue
        if fraction != max(fractions):
            _write(os.path.join(workdir, "fractions", f"f{fraction:g}"), result, ctx, fingerprint,
                   name=f"{name}@{fraction:g}")
        if len(fractions) > 1:
            entries.append(robustness.label_efficiency_entry(
                fraction=fraction, probs=result["test_probs"][0], labels=result["test_labels"],
                label_names=label_names, num_train=result["num_train"], seed=config.seed))
    record = {"init": config.init, "method": ctx.encoder.method, "seeds": int(config.seeds),
              "selection": f"mean validation AUC of the last {config.selection_evals} evaluations",
              "read_test": bool(config.read_test),
              "fractions": [{k: v for k, v in results[f].items()
                             if k not in ("test_probs", "test_labels", "thresholds")} for f in fractions]}
    if jax.process_index() == 0:
        jsonio.write_json(os.path.join(workdir, "finetune.json"), record)

    main = results[max(fractions)]
    if not config.read_test:
        _save_selected(config, workdir, main)
        logging_lib.log(f"validation only (config.read_test=False): the test split was not read; wrote "
                        f"{os.path.join(workdir, 'finetune.json')}; the same command with --config.read_test=True "
                        "reads it, reusing every run")
        return record
    variables = load_model(main["model_dir"])
    curves = None
    if config.robustness:
        sharding.check_single_host("config.robustness")
        logging_lib.log("robustness: evaluating the selected model on perturbed test images")
        images, _ = features_lib.load_images(store, ctx.splits.test, image_size=config.image_size,
                                             batch_size=config.batch_size)
        placed = sharding.replicate(variables, ctx.mesh)
        curves = robustness.robustness_curves(
            lambda x: features_lib.padded_apply(lambda b: ctx.predict_fn(placed, b), x, ctx.mesh),
            images, main["test_labels"], label_names=label_names, batch_size=config.batch_size)
    summary = _write(workdir, main, ctx, fingerprint, name=config.name or None, label_fractions=entries or None,
                     robustness_curves=curves)
    per_label = ", ".join(f"{n} {metrics.fmt_auc(a)}" for n, a in summary["per_label_auc"].items())
    if summary["top1_accuracy"] is not None:
        logging_lib.log(f"fine-tune test top-1 accuracy {summary['top1_accuracy']:.4f} (multi-class; the mean AUC "
                        "below is the macro one-vs-rest AUC)")
    logging_lib.log(f"fine-tune test mean AUC {metrics.fmt_auc(main['test_mean_auc'])} over {len(main['seeds'])} "
                    f"seed(s) (spread {main['test_mean_auc_spread']}), setting {main['chosen']['name']} chosen on "
                    f"validation; seed {config.seed}: {metrics.fmt_auc(summary['mean_auc'])} ({per_label})")

    _save_selected(config, workdir, main)

    if shift is not None:
        shift_store, model_cols, store_cols, names = shift
        ids = shift_store.ids(config.shift_split)
        probs, labels = _predict(ctx, variables, ids, shift_store)
        shift_summary = records.write_eval(
            os.path.join(workdir, "shift"), probs=probs[:, model_cols], labels=labels[:, store_cols],
            record_ids=ids, label_names=names, mode="eval", method=ctx.encoder.method, init=config.init,
            split=config.shift_split, store_name=shift_store.name,
            store_fingerprint=records.store_fingerprint(shift_store.path), name=f"{name} on {shift_store.name}",
            extra={"finetuned_on": {"store": store.name, "fingerprint": fingerprint},
                   "setting": main["chosen"]["name"]})
        logging_lib.log(f"distribution shift ({shift_store.name}, {len(ids)} images, labels {names}): mean AUC "
                        f"{metrics.fmt_auc(shift_summary['mean_auc'])} -> {os.path.join(workdir, 'shift', 'eval')}")
    logging_lib.log(f"wrote {os.path.join(workdir, 'eval')} and {os.path.join(workdir, 'finetune.json')}")
    return summary


def _save_selected(config, workdir: str, main: dict) -> None:
    if config.save_model:
        if jax.process_index() == 0:
            shutil.copytree(main["model_dir"], os.path.join(workdir, "export"), dirs_exist_ok=True)
        logging_lib.log(f"saved the selected model to {os.path.join(workdir, 'export')} (encoder export + head.npz)")


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


def _write(directory, result, ctx: Context, fingerprint, *, name, **optional) -> dict:
    config = ctx.config
    return records.write_eval(
        directory, probs=result["test_probs"][0], labels=result["test_labels"], record_ids=ctx.splits.test,
        label_names=list(ctx.store.label_names), mode="finetune", method=ctx.encoder.method, init=config.init,
        split=ctx.splits.params["test"], store_name=ctx.store.name, store_fingerprint=fingerprint,
        label_fraction=result["fraction"], name=name, curves=result["val_curve"],
        extra={"setting": result["chosen"], "seeds": result["seeds"],
               "grid": [{k: g[k] for k in ("name", "score", "final_val_auc")} for g in result["grid"]],
               "test_mean_auc_over_seeds": result["test_mean_auc"],
               "test_mean_auc_spread": result["test_mean_auc_spread"], "num_train": result["num_train"],
               "batch_size": result["batch_size"], "pos_weight": result["pos_weight"], "splits": ctx.splits.fingerprint,
               "source": ctx.encoder.source},
        thresholds=result["thresholds"], **optional)
