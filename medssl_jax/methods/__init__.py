"""SSL methods. Each is a module with the interface the train loop calls (see train.py):

    data_spec(config) -> {"sampler": ..., "crops": [...]}     what the host pipeline must produce
    build(config) -> flax module                              encoder + heads
    init(model, rng, batch, config) -> (variables, method_state)
    loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config)
        -> (loss, (batch_stats, method_state, metrics))
    encoder_variables(variables) -> the encoder's variables (what is exported)
    with_encoder_variables(variables, encoder) -> variables with the encoder part replaced (config.init)
optional:
    process_grads(grads, *, step, config) -> grads
    after_update(params, method_state, *, step, config) -> (params, method_state)
    check_health(metrics, *, step) -> None | str              a message when training has collapsed
    export_variables(variables, method_state) -> encoder variables to export instead of
        encoder_variables(variables) (DINO: the teacher)
    extend_config(config) -> None                              add the method's own config fields
"""

from __future__ import annotations

import importlib
from types import ModuleType

# method name -> module under medssl_jax.methods
_REGISTRY = {
    "simclr": "simclr",
    "micle": "simclr",
    "swav": "swav",
    "hybrid": "swav",
    "dino": "dino",
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


def multicrop_features(encoder, crops, *, train: bool):
    """Runs each crop resolution through `encoder` as its own batch (fixed shapes, one compile each).

    crops: a tuple of [B, n_i, H_i, W_i, C] groups (or one [B, H, W, C] array); returns features
    [B, sum n_i, D] (a device-local concatenation: rows stay on their device) and the encoder's
    out_dict for the first group.
    """
    import jax.numpy as jnp

    if not isinstance(crops, (list, tuple)):
        crops = (crops[:, None],)
    features, encoder_out = [], {}
    for index, group in enumerate(crops):
        batch, num = group.shape[:2]
        f, out = encoder(group.reshape(batch * num, *group.shape[2:]), train=train)
        features.append(f.reshape(batch, num, -1))
        if index == 0:
            encoder_out = out
    return jnp.concatenate(features, axis=1), encoder_out


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ModuleType:
    if name not in _REGISTRY:
        raise ValueError(f"config.method={name!r} is not one of {names()}")
    return importlib.import_module(f"medssl_jax.methods.{_REGISTRY[name]}")
