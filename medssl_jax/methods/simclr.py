"""SimCLR and MICLe (Azizi et al. 2021).

Both minimise NT-Xent between two views of a batch element. They differ only in what an element is:
for SimCLR ('pairs' sampler) it is one image, viewed twice; for MICLe ('micle' sampler) it is one
patient case, and the two views come from two *different* images of that patient when it has more than
one (otherwise two views of its only image). Single- and multi-image cases mix in one batch with no
extra weighting, as in the paper's Algorithm 1. All of that is the sampler's job (data/pipeline.py);
the loss below is the same for both.

Views are laid out [B, 2, H, W, C] and flattened to [2B, ...] sample-major, so both views of an element
stay on the same device and BatchNorm sees all 2B views at once (SimCLR's global BN).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medssl_jax import augment, losses, models
from medssl_jax.methods import Method
from medssl_jax.models import heads


class SSLModel(nn.Module):
    """Encoder followed by a projection head; returns (z, out_dict) like every model here."""

    encoder: nn.Module
    head: nn.Module

    def __call__(self, x, *, train: bool):
        features, encoder_out = self.encoder(x, train=train)
        z, head_out = self.head(features, train=train)
        return z, {"encoder": encoder_out, "features": features, "head": head_out, "z": z}


def data_spec(config) -> dict:
    sampler = "micle" if config.method == "micle" else config.data.sampler
    return {
        "sampler": sampler,
        "crops": [
            {"name": "global", "num": 2, "size": config.data.image_size, "scale": tuple(config.data.crop_scale)}
        ],
    }


def build(config) -> nn.Module:
    encoder = models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype})
    head = heads.ProjectionHead(
        version=config.head.version,
        hidden_dim=config.head.hidden_dim if config.head.hidden_dim > 0 else None,  # None: encoder width
        out_dim=config.head.out_dim,
        dtype=jnp.dtype(config.compute_dtype),
    )
    return SSLModel(encoder=encoder, head=head)


def init(model: nn.Module, rng: jax.Array, batch: dict, config) -> tuple[dict, Any]:
    views = batch["global"]
    example = jnp.zeros((2, *views.shape[2:]), jnp.float32)
    variables = model.init(rng, example, train=True)
    return dict(variables), {}


def loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config):
    del step
    views = batch["global"]
    batch_size = views.shape[0]
    x = augment.augment_views(views, rng=rng, cfg=config.augment)
    x = x.reshape(batch_size * 2, *x.shape[2:])  # sample-major: both views of an element on one device
    (z, _), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    z = z.reshape(batch_size, 2, -1)
    loss = losses.ntxent(z1=z[:, 0], z2=z[:, 1], temperature=config.loss.temperature,
                         hidden_norm=config.loss.hidden_norm, scale=config.loss.scale)
    return loss, (updates["batch_stats"], method_state, {"loss": loss})


METHOD = Method(data_spec=data_spec, build=build, init=init, loss_fn=loss_fn)
