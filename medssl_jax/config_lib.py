"""Building blocks for the files in configs/: argument parsing, the base configs, durations, validation.

Every config file's `get_config(arg)` starts from `pretrain_config()` (or `eval_config()`), sets what
its experiment needs and returns a ConfigDict. main.py locks the result, so `--config.optim.base_lr=...`
with a mistyped key fails before any work starts; `check_known_keys` also catches a typo made inside a
config file, which would otherwise silently add a new field.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import ml_collections as mlc

from medssl_jax import augment, methods, monitor, optim
from medssl_jax.evaluate import probe

MODES = ("pretrain", "linear_probe", "finetune", "transfer")


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
    """Parses big_vision-style config arguments: `configs/micle.py:runlocal,variant=r50x4`.

    Every key must be declared in `defaults`, whose values also give the types. A bare key means True
    for booleans ("runlocal"); `key=value` otherwise.
    """
    result = mlc.ConfigDict(defaults)
    if not arg:
        return result
    for item in (part.strip() for part in arg.split(",")):
        if not item:
            continue
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ValueError(
                f"config argument {key!r} is not one of {sorted(defaults)} (given {arg!r})"
            )
        default = defaults[key]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value: {key}=...")
            result[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            result[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            result[key] = int(value)
        elif isinstance(default, float):
            result[key] = float(value)
        else:
            result[key] = value
    return result


def shipped_configs_dir() -> str:
    """The configs that come with the code: medssl_jax/configs in an installed package, else the
    checkout's configs/ folder beside the package."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "configs")


def load_config(name: str, arg: str | None = None) -> mlc.ConfigDict:
    """`get_config(arg)` of the shipped config `name` ('micle' or 'micle.py'): how one recipe builds on
    another (configs/simclr.py on micle.py, hybrid.py on swav.py), and how tests and benchmarks start
    from the recipes users run."""
    path = os.path.join(shipped_configs_dir(), name if name.endswith(".py") else name + ".py")
    if not os.path.isfile(path):
        raise ValueError(f"no shipped config {name!r} in {shipped_configs_dir()}")
    spec = importlib.util.spec_from_file_location(f"medssl_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def pretrain_config() -> mlc.ConfigDict:
    """The fields every pretraining run reads, whatever its method: run length, data, encoder, optimiser,
    checkpoints, the end-of-pretraining probe and the online monitor. Each method adds its own fields
    (`methods.get(name).extend_config`: SimCLR's head and loss, SwAV's prototypes, DINO's teacher);
    config files call it, then override values."""
    c = mlc.ConfigDict()
    c.mode = "pretrain"
    c.method = "simclr"  # simclr | micle | swav | hybrid | dino
    c.seed = 0
    # Encoder initialisation before SSL: '' (random), or an export/converted checkpoint directory
    # (two-stage pretraining: natural-image weights -> medical SSL).
    c.init = ""

    # Durations: give total_steps, or total_epochs (epochs over the sampler's elements: images for
    # 'pairs', patients for 'micle'). Warm-up likewise, as optim.warmup_steps or optim.warmup_epochs.
    c.batch_size = 256
    c.total_steps = -1
    c.total_epochs = 100.0

    c.compute_dtype = "bfloat16"
    c.mesh = (("data", -1),)
    # How parameters, optimiser state and method state are laid out (sharding.state_shardings): () =
    # replicated (data parallel); FSDP: mesh (("data", -1), ("fsdp", 8)) and ((".*", "fsdp"),).
    c.sharding_rules = ()

    c.data = mlc.ConfigDict()
    # '' = the embedded phantom dataset, generated on first use and cached in data.cache_dir.
    c.data.store = ""
    c.data.cache_dir = ""  # '' = $MEDSSL_JAX_CACHE, else ~/.cache/medssl_jax
    c.data.phantom_patients = 1200
    c.data.phantom_size = 256
    c.data.phantom_seed = 0
    c.data.split = "train"
    c.data.sampler = "pairs"  # pairs | micle
    c.data.image_size = 224
    c.data.crop_scale = (0.08, 1.0)
    c.data.num_workers = 0  # Grain worker processes; 0 = in the main process

    # Device-side photometric augmentation; every field can be overridden (see medssl_jax/augment.py).
    c.augment = augment.preset("azizi_cxr")

    c.model = mlc.ConfigDict()
    c.model.name = "resnet"
    c.model.depth = 50
    c.model.width = 1
    c.model.base_width = 64
    c.model.zero_init_last_bn = True
    c.model.cifar_stem = False  # True: 3x3/1 stem without max-pool, for 28-32 px images (models/resnet.py)

    # LARS, lr 0.3 per 256 images (linear scaling), warm-up then cosine, wd 1e-6: see medssl_jax/optim.py.
    c.optim = optim.default_config("lars")
    optim.add_encoder_update_fields(c.optim)
    c.optim.warmup_steps = -1  # -1: use warmup_epochs
    c.optim.warmup_epochs = 10.0

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    c.probe = linear_probe_fields()
    # Online monitor during pretraining (medssl_jax/monitor.py): kNN / ridge-probe AUC on validation images,
    # RankMe, embedding std, alignment / uniformity; collapse warnings; the best step.
    c.monitor = monitor.default_config()
    return c


# SimCLR width-multiplier ResNets used by Azizi et al. (configs/micle.py, derm.py): variant -> (depth, width).
AZIZI_VARIANTS = {"r50x1": (50, 1), "r50x4": (50, 4), "r152x2": (152, 2)}
# DINOv3's ConvNeXts as the encoder of any pretraining config (`variant=` / `encoder=` arguments).
CONVNEXT_ENCODERS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


def use_convnext(c: mlc.ConfigDict, encoder: str) -> None:
    """Makes a pretraining config's encoder DINOv3's ConvNeXt of that size (`convnext_tiny` ... `_large`),
    grey input (a converted RGB checkpoint given as config.init has its stem summed over RGB, as for the
    ResNets). Every crop is raised to at least 32 px, the ConvNeXt's total stride (a smaller one would
    leave no feature map). The method's other values stay the recipe's (chosen for its ResNet)."""
    from medssl_jax import models

    if encoder not in CONVNEXT_ENCODERS:
        raise ValueError(f"encoder {encoder!r} is not one of {list(CONVNEXT_ENCODERS)}")
    c.model = models.model_config("convnext", size=encoder.split("_")[1], in_chans=1)
    crops_at_least(c, 32)


def crops_at_least(c: mlc.ConfigDict, size: int) -> None:
    """Raises every crop size of a pretraining config (global, and SwAV's / DINO's local ones) to `size`."""
    c.data.image_size = max(c.data.image_size, size)
    for group in ("swav", "dino"):
        if group in c:
            c[group].local_image_size = max(c[group].local_image_size, size)


# The embedded phantom store every `:runlocal` config (pretraining and evaluation) uses: 2000 patients at
# 64 px, about 4,400 images (train 45 %, val 15 %, test 40 % of the patients: ~1,750 test images, enough for
# a mean-AUC CI of about +-0.02), generated in about 10 s on first use.
RUNLOCAL_PHANTOMS = {"phantom_patients": 2000, "phantom_size": 64}


def apply_runlocal(c: mlc.ConfigDict, *, image_size: int, probe_size: int) -> None:
    """The CPU-sized settings every `:runlocal` pretraining config shares: the embedded phantom dataset
    (RUNLOCAL_PHANTOMS), float32 (bf16 is emulated, hence slow, on CPUs), batch 64 in-process."""
    c.compute_dtype = "float32"
    c.data.update(RUNLOCAL_PHANTOMS)
    c.data.image_size = image_size
    c.data.num_workers = 0
    c.batch_size = 64
    c.total_steps = 300
    c.optim.warmup_steps = 30
    c.log_every = 25
    c.checkpoint_every = 100
    c.probe.image_size = probe_size
    c.probe.batch_size = 128


def linear_probe_fields() -> mlc.ConfigDict:
    """The end-of-pretraining linear probe (also used by configs/linear_probe.py)."""
    p = mlc.ConfigDict()
    p.enabled = True
    p.train_split = "train"
    p.test_split = "test"
    p.image_size = 224
    p.batch_size = 256
    p.feature = "pre_logits"  # which entry of the encoder's out_dict
    # Validation patients (to choose C and the decision thresholds): '' = the store's 'val' split if it has
    # one, else `val_fraction` of train_split's patients (see evaluate/splits.py).
    p.val_split = ""
    p.val_fraction = 0.2
    p.c_grid = probe.C_GRID
    # Also probe a random-init encoder of the same architecture (standard init, every residual branch
    # active, BatchNorm statistics recomputed on the train images) and compare the two (paired bootstrap).
    p.random_baseline = True
    return p


def _need(condition: bool, field: str, value, rule: str) -> None:
    if not condition:
        raise ValueError(f"config.{field}={value!r}: {rule}")


def _positive(config, *fields) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        _need(isinstance(value, (int, float)) and value > 0, field, value, "must be > 0")


def _steps_or_sentinel(config, field: str) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _need(value == -1 or value >= 1, field, value, "must be >= 1 (or -1 to use the epochs field)")


def validate_pretrain(config) -> None:
    """Refuses, in one line naming the field, values that make no sense, before any data or device work."""
    _positive(config, "batch_size", "optim.base_lr", "log_every", "checkpoint_every", "keep_checkpoints",
              "data.image_size", "probe.image_size", "probe.batch_size")
    _steps_or_sentinel(config, "total_steps")
    if config.total_steps == -1:
        _positive(config, "total_epochs")
    _need(config.optim.warmup_steps >= -1, "optim.warmup_steps", config.optim.warmup_steps,
          "must be >= 0 (or -1 to use optim.warmup_epochs)")
    if config.optim.warmup_steps == -1:
        _need(config.optim.warmup_epochs >= 0, "optim.warmup_epochs", config.optim.warmup_epochs, "must be >= 0")
    _need(config.optim.weight_decay >= 0, "optim.weight_decay", config.optim.weight_decay, "must be >= 0")
    _need(all(float(c) > 0 for c in config.probe.c_grid) and len(config.probe.c_grid) > 0, "probe.c_grid",
          tuple(config.probe.c_grid), "needs one or more values > 0")
    _need(0 < config.probe.val_fraction < 1, "probe.val_fraction", config.probe.val_fraction, "must be in (0, 1)")
    methods.get(config.method).check_config(config)
    monitor.validate(config)


def validate_eval(config) -> None:
    """The same for the evaluation modes (linear_probe, finetune)."""
    _positive(config, "batch_size", "image_size")
    _need(0 < config.splits.val_fraction < 1, "splits.val_fraction", config.splits.val_fraction, "must be in (0, 1)")
    if "c_grid" in config:
        _need(len(config.c_grid) > 0 and all(float(c) > 0 for c in config.c_grid), "c_grid", tuple(config.c_grid),
              "needs one or more values > 0")
    if "random_zero_init_grid" in config:
        grid = tuple(config.random_zero_init_grid)
        _need(bool(grid) and all(isinstance(v, bool) for v in grid) and len(set(grid)) == len(grid),
              "random_zero_init_grid", grid, "give one or both of False, True (the zero_init_last_bn values a "
              "random-init ResNet probe is fit with)")
    if config.mode == "finetune":
        _positive(config, "log_every")
    if not config.get("read_test", True):
        for field in ("robustness", "shift_store"):
            _need(not config.get(field), field, config.get(field),
                  "evaluates the test split (or another store's images): it needs config.read_test=True")


def check_image_size(store, split: str | None, size: int, *, field: str, sample: int = 16) -> None:
    """Refuses an input size larger than the stored images: every crop would be upsampled."""
    ids = store.ids(split)[:sample]
    if len(ids) == 0:
        return
    largest = max(max(store[int(i)]["image"].shape[:2]) for i in ids)
    if size > largest:
        raise ValueError(f"config.{field}={size} is larger than the images of store {store.path} (longest side "
                         f"{largest} px in its first {len(ids)} {split!r} records): they would be upsampled "
                         f"{size / largest:.1f}x; use at most {largest} or re-ingest at a larger --size")


def check_known_keys(config: mlc.ConfigDict, reference: mlc.ConfigDict, prefix: str = "") -> None:
    """Raises ValueError on the first key of `config` that `reference` does not have."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(f"unknown config key {name!r} (not a field of the {config.get('method', '')} config)")
        if isinstance(value, mlc.ConfigDict) and isinstance(reference[key], mlc.ConfigDict):
            check_known_keys(value, reference[key], prefix=name + ".")


def to_steps(config: mlc.ConfigDict, prefix: str, *, epoch_size: int, batch_size: int) -> int:
    """Converts `{prefix}_steps` or `{prefix}_epochs` into steps (steps win when both are set)."""
    steps = config.get(f"{prefix}_steps", -1)
    if steps is not None and steps >= 0:
        return int(steps)
    epochs = config.get(f"{prefix}_epochs", None)
    if epochs is None or epochs < 0:
        raise ValueError(f"config needs {prefix}_steps or {prefix}_epochs")
    return int(math.ceil(epochs * epoch_size / batch_size))


def resolve_durations(config: mlc.ConfigDict, *, epoch_size: int, batch_size: int) -> mlc.ConfigDict:
    """A copy of `config` in which every `X_steps` of -1 is `X_epochs` converted to steps, at any depth.

    Recipes count some durations in epochs (SwAV's queue from epoch 15, its prototypes frozen for one
    epoch; a warm-up of 10 epochs), while the jitted step only knows steps: this runs once the train
    split's size is known, so `X_steps` is what the methods read.
    """
    resolved = config.copy_and_resolve_references()

    def visit(node: mlc.ConfigDict, prefix: str) -> None:
        for key in list(node.keys()):
            value = node[key]
            if isinstance(value, mlc.ConfigDict):
                visit(value, f"{prefix}{key}.")
            elif key.endswith("_steps") and isinstance(value, int) and value < 0:
                epochs_key = key[: -len("_steps")] + "_epochs"
                epochs = node.get(epochs_key, None)
                if value != -1 or epochs is None or not isinstance(epochs, (int, float)) or epochs < 0:
                    raise ValueError(f"config.{prefix}{key}={value}: give a step count >= 0, or -1 with "
                                     f"config.{prefix}{epochs_key} >= 0 (now {epochs!r})")
                node[key] = to_steps(node, key[: -len("_steps")], epoch_size=epoch_size, batch_size=batch_size)

    visit(resolved, "")
    return resolved


def eval_config() -> mlc.ConfigDict:
    """Fields every evaluation mode reads (linear_probe, finetune); each mode's module adds its own.

    The splits (patient-wise train/val/test and nested label-fraction subsets of the train patients)
    are a function of the store's patient keys and `splits.seed` alone, so every run that compares
    encoders on one store gets the same records; see medssl_jax/evaluate/splits.py.
    """
    c = mlc.ConfigDict()
    c.mode = ""
    c.seed = 0
    # What the encoder starts from: an export (RUN/export), a converted checkpoint directory
    # (`python -m medssl_jax.convert`, same layout) or 'random' (then `model` gives the architecture).
    c.init = ""
    c.method = ""  # pretraining method of the init, for the report; '' = the export's own record
    c.name = ""  # display name in `medssl_jax.compare`; '' = the workdir's name
    c.compute_dtype = "float32"
    c.mesh = (("data", -1),)
    # Fine-tuning: how the model and optimiser state are laid out (see pretrain_config); () = replicated.
    c.sharding_rules = ()
    c.batch_size = 256
    c.image_size = 224
    # 'auto': the input normalisation the encoder records (converted checkpoints: their training's mean/std,
    # see models/input_norm.py; our own exports: none); 'none': pixels in [0, 1] whatever it recorded.
    c.input_normalization = "auto"
    # Encoder config for init='random', e.g. {'name': 'resnet', 'depth': 50, 'width': 1}; None here so a
    # config file may use any encoder's fields (models.build_encoder rejects unknown ones).
    c.model = None

    c.data = mlc.ConfigDict()
    c.data.store = ""  # '' = the embedded phantom dataset (same fields as pretrain_config().data)
    c.data.cache_dir = ""
    c.data.phantom_patients = 1200
    c.data.phantom_size = 256
    c.data.phantom_seed = 0
    c.data.num_workers = 0  # Grain worker processes for the training iterator

    c.splits = mlc.ConfigDict()
    c.splits.train = "train"  # store split the training (and carved validation) patients come from
    c.splits.test = "test"
    # '' = the store's 'val' split if it has one, else `val_fraction` of the train patients; a store split
    # name ('val'); or the train split's name to always carve from train.
    c.splits.val = ""
    c.splits.val_fraction = 0.2
    c.splits.seed = 0
    c.splits.file = ""  # reuse another workdir's splits.json (checked against the store)

    # Fractions of the train patients (nested subsets); one probe / fine-tune per fraction.
    c.label_fractions = (1.0,)
    c.robustness = False  # also evaluate the test images under evaluate/robustness.py perturbations
    # False: every choice is made on validation as usual, and the evaluation stops there: the test split is
    # never predicted, so no test AUC is computed, logged or written (for exploring settings without seeing
    # test). The same command with True in the same workdir then reads test once, reusing every finished run.
    c.read_test = True
    return c
