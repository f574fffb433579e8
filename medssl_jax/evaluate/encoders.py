"""The encoders an evaluation starts from: an export, a converted checkpoint, or the fair random init.

`load_encoder` builds the encoder `config.init` names (its architecture from the export's config.json, or
`config.model` for 'random') with its input normalisation, and loads its weights; `fair_random_init` makes
a random-init encoder a fair baseline (BatchNorm statistics recomputed on the train images), and
`random_baseline_model` gives the architecture of that baseline for an export. The linear probe,
fine-tuning, the end-of-pretraining probe and the online monitor all start here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax import checkpoint, logging_lib, models
from medssl_jax.data.store import Store
from medssl_jax.evaluate import features as features_lib

# Converted checkpoints record their file format; what their weights were trained with, for the report.
CONVERTED_METHODS = {"dinov2": "dinov2", "hf-dinov2": "dinov2", "dinov3": "dinov3", "hf-dinov3": "dinov3",
                     "timm-npz": "supervised", "timm": "supervised", "torchvision-resnet": "supervised"}


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
    one from `encoder.model_config`; for a ResNet both residual-branch inits are standard (every branch
    active, or zero_init_last_bn: every block starts as its shortcut), and the linear probe fits both and
    keeps the better one on validation. Returns the encoder with new variables and `baseline` describing both.
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
    logging_lib.log(f"random-init baseline: {baseline['residual_branches']}; BatchNorm statistics "
                    f"{baseline['batch_stats']}")
    return dataclasses.replace(encoder, variables=variables, baseline=baseline)


def has_residual_init_choice(model_config) -> bool:
    """Whether the architecture has two standard random inits of its residual branches (a ResNet: every
    branch active, or zero_init_last_bn). The one test the linear probe (the transfer study's and the
    end-of-pretraining one) and the monitor's reference use, so they cannot disagree on which architectures
    get both. A fine-tune from scratch does not choose: it starts like pretraining (config.model)."""
    return "zero_init_last_bn" in model_config or model_config.get("name") == "resnet"


def random_baseline_model(model_config: dict) -> dict:
    """The export's architecture for its random-init baseline, every residual branch active at initialisation
    (zero_init_last_bn=False; the export has True, a training aid of pretraining). The linear probe fits this
    and the zero-initialised variant (`random_zero_init_grid`) and keeps the better one on validation.
    """
    model = dict(model_config)
    if has_residual_init_choice(model):
        model["zero_init_last_bn"] = False
    return model


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
