"""Encoders and heads, and the registry that builds an encoder from a config.

`build_encoder(cfg)` picks the encoder by `cfg.name` and passes the remaining config fields as module
attributes, so a config typo fails as a TypeError naming the field. A new encoder registers a
module path and class name in `ENCODERS`; modules are imported only when their encoder is built, so a
ResNet run never imports the ViT code.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax.numpy as jnp

from medssl_jax.models.heads import LinearClassifier, ProjectionHead
from medssl_jax.models.resnet import ResNet

# name -> (module path, class name)
ENCODERS = {
    "resnet": ("medssl_jax.models.resnet", "ResNet"),
    "vit": ("medssl_jax.models.vit", "ViT"),
    "convnext": ("medssl_jax.models.convnext", "ConvNeXt"),
}

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def build_encoder(cfg) -> nn.Module:
    """Builds the encoder named by `cfg.name` with the other fields of `cfg` as its attributes.

    `cfg` is an ml_collections ConfigDict (or a mapping), e.g.
    `{'name': 'resnet', 'depth': 50, 'width': 1, 'dtype': 'bfloat16'}`. `dtype` may be given by name.
    """
    fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = fields.pop("name", None)
    if name not in ENCODERS:
        raise ValueError(f"encoder name={name!r} is not one of {sorted(ENCODERS)}")
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in _DTYPES:
            raise ValueError(f"encoder dtype={fields['dtype']!r} is not one of {sorted(_DTYPES)}")
        fields["dtype"] = _DTYPES[fields["dtype"]]
    for key in ("input_mean", "input_std"):  # JSON gives lists; module attributes stay hashable
        if key in fields:
            fields[key] = tuple(float(v) for v in fields[key])
    module_path, class_name = ENCODERS[name]
    encoder_cls = getattr(importlib.import_module(module_path), class_name)
    try:
        return encoder_cls(**fields)
    except TypeError as error:
        raise ValueError(f"encoder config for {name!r} has a field {class_name} does not take: {error}") from None


def encoder_fields(name: str) -> dict:
    """{'name': name, field: default, ...}: every config field the encoder `name` takes (dtype comes from
    config.compute_dtype), so a model section can be checked for typos against the encoder it names."""
    import dataclasses

    if name not in ENCODERS:
        raise ValueError(f"encoder name={name!r} is not one of {sorted(ENCODERS)}")
    module_path, class_name = ENCODERS[name]
    encoder_cls = getattr(importlib.import_module(module_path), class_name)
    return {"name": name, **{f.name: f.default for f in dataclasses.fields(encoder_cls)
                             if f.name not in ("parent", "name", "dtype")}}


def model_config(name: str, **overrides):
    """`config.model` for encoder `name`: every field with its default (encoder_fields), `overrides`
    applied; a field the encoder does not have is rejected here, like any other config typo."""
    import ml_collections as mlc

    fields = encoder_fields(name)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"model_config({name!r}): {unknown} are not {name} fields")
    if name == "vit":
        # 'xla' rather than the module's None: a None config field cannot be set from the command line
        # (`--config.model.attention=cudnn` on a GPU).
        fields["attention"] = "xla"
    return mlc.ConfigDict({**fields, **overrides})


__all__ = ["ENCODERS", "LinearClassifier", "ProjectionHead", "ResNet", "build_encoder", "encoder_fields",
           "model_config"]
