"""SSL methods: one `Method` per method, the whole interface the train loop (train.py) calls.

A method lives in one module here (simclr.py for SimCLR and MICLe, swav.py for SwAV and the Ghesu et al.
hybrid, dino.py for DINO) that ends with `METHOD = Method(...)`; its loss is in medssl_jax/losses, its
heads in medssl_jax/models/heads.py, its recipe in configs/<name>.py and its collapse monitor, if any, in
health.py. `get(config.method)` returns the Method.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from medssl_jax import optim

# method name -> module under medssl_jax.methods
_REGISTRY = {
    "simclr": "simclr",
    "micle": "simclr",
    "swav": "swav",
    "hybrid": "swav",
    "dino": "dino",
    "supervised": "supervised",  # fine-tuning (evaluate/finetune.py runs it)
}


def encoder_variables(variables: dict) -> dict:
    """The encoder's part of a model whose encoder submodule is named 'encoder' (what gets exported)."""
    return {collection: tree["encoder"] for collection, tree in variables.items() if "encoder" in tree}


def with_encoder_variables(variables: dict, encoder: dict) -> dict:
    """`variables` with the encoder part replaced (initialisation from an export, `config.init`)."""
    result = {collection: dict(tree) for collection, tree in variables.items()}
    for collection, tree in encoder.items():
        result[collection]["encoder"] = tree
    return result


def multicrop_spec(config, *, num_local: int, local_size: int, local_scale) -> list[dict]:
    """The crop groups of a multi-crop method: 2 global crops (data.image_size, data.crop_scale) and, if
    num_local > 0, num_local local crops; the pipeline makes them, `models.ssl.multicrop_features` encodes them."""
    crops = [{"name": "global", "num": 2, "size": config.data.image_size, "scale": tuple(config.data.crop_scale)}]
    if num_local > 0:
        crops.append({"name": "local", "num": num_local, "size": local_size, "scale": tuple(local_scale)})
    return crops


def check_crops(batch: dict, crops: list[dict]) -> None:
    """Every crop group of `crops` is in `batch` with the shape [B, num, size, size, C]."""
    for crop in crops:
        views = batch[crop["name"]]
        if views.shape[1] != crop["num"] or views.shape[2] != crop["size"]:
            raise ValueError(f"batch[{crop['name']!r}] has shape {views.shape}, expected "
                             f"[B, {crop['num']}, {crop['size']}, {crop['size']}, C] (config / pipeline mismatch)")


def _no_fields(config) -> None:
    del config


def _grads_as_they_are(grads, *, step, config):
    del step, config
    return grads


def _params_as_they_are(params, method_state, *, step, config):
    del step, config
    return params, method_state


def _always_healthy(metrics, *, step) -> None:
    del metrics, step
    return None


def _optimizer_of_config(config, *, total_steps: int, batch_size: int):
    return optim.make_optimizer(config.optim, total_steps=total_steps, batch_size=batch_size)


def _no_inputs(config) -> dict:
    del config
    return {}


def _init_optimizer(tx, params, inputs):
    del inputs
    return tx.init(params)


def _export_encoder(variables: dict, method_state: Any) -> dict:
    del method_state
    return encoder_variables(variables)


@dataclasses.dataclass(frozen=True)
class Method:
    """Every hook the train loop calls, in the order it calls them; the optional ones have defaults.

    Required:
      data_spec(config) -> {"sampler": 'pairs' | 'micle', "crops": [{name, num, size, scale}, ...],
          "fields": [extra per-sample fields, e.g. 'labels'], optional "seed" (the data order's, default
          config.seed)}: what the host pipeline must produce.
      build(config) -> flax module: encoder (submodule 'encoder') + heads.
      init(model, rng, batch, config, inputs) -> (variables, method_state): method_state is checkpointed with
          the run (a queue, a teacher, a centre); `inputs` is `init_inputs(config)`, as traced arrays.
      loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config)
          -> (loss, (batch_stats, method_state, metrics)): pure, jitted, over the global batch.
    Optional:
      make_optimizer(config, *, total_steps, batch_size) -> (optax transformation, schedule of the step or
          None when the lr lives in the optimiser state): default optim.make_optimizer(config.optim, ...).
      init_inputs(config) -> {name: array}: the values of a run that its init reads as data rather than as
          compiled-in constants (fine-tuning: the run's seed, pos_weight, lr schedule), so that the runs of a
          transfer study share one compiled init, as they share one compiled step; default {}.
      init_optimizer(tx, params, inputs) -> the optimiser state of fresh params: default tx.init(params).
      runtime_fields: the config fields (dotted) that reach the compiled init and step only through
          init_inputs (or the host pipeline), never as constants: setups of one process that differ only
          in them reuse the jitted init and step (train.setup), without tracing them again; default ().
      extend_config(config): adds the method's own config fields (to the reference config too, so a
          mistyped field of the method is rejected).
      check_config(config): refuses a nonsense value of those fields in one line naming it, before any
          data or device work (config_lib.validate_pretrain calls it).
      process_grads(grads, *, step, config) -> grads: before the optimiser (freezing, clipping).
      after_update(params, method_state, *, step, config) -> (params, method_state): after the optimiser
          (prototype normalisation, EMA teacher).
      check_health(metrics, *, step) -> None | str: on host metrics at every log step; a message stops
          the run (collapse).
      encoder_variables(variables) -> the encoder's variables; with_encoder_variables(variables, encoder)
          -> variables with the encoder replaced (config.init).
      export_variables(variables, method_state) -> the encoder variables to export (DINO: the teacher's).
    """

    data_spec: Callable[..., dict]
    build: Callable[..., Any]
    init: Callable[..., tuple]
    loss_fn: Callable[..., tuple]
    extend_config: Callable[..., None] = _no_fields
    check_config: Callable[..., None] = _no_fields
    make_optimizer: Callable[..., tuple] = _optimizer_of_config
    init_inputs: Callable[[Any], dict] = _no_inputs
    init_optimizer: Callable[..., Any] = _init_optimizer
    process_grads: Callable[..., Any] = _grads_as_they_are
    after_update: Callable[..., tuple] = _params_as_they_are
    check_health: Callable[..., str | None] = _always_healthy
    encoder_variables: Callable[[dict], dict] = encoder_variables
    with_encoder_variables: Callable[[dict, dict], dict] = with_encoder_variables
    export_variables: Callable[[dict, Any], dict] = _export_encoder
    runtime_fields: tuple[str, ...] = ()


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The Method of `config.method`."""
    if name not in _REGISTRY:
        raise ValueError(f"config.method={name!r} is not one of {names()}")
    return importlib.import_module(f"medssl_jax.methods.{_REGISTRY[name]}").METHOD
