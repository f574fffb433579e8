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
import ml_collections as mlc

from medssl_jax import augment, losses, models
from medssl_jax.methods import Method
from medssl_jax.models import heads
from medssl_jax.models.ssl import SSLModel


LOSS_SCALES = ("paper", "official")


def extend_config(config: mlc.ConfigDict) -> None:
    """Adds SimCLR's projection head (`config.head`) and NT-Xent (`config.loss`) fields, SimCLR v1's values."""
    config.head = projection_head_fields()
    loss = mlc.ConfigDict()
    loss.temperature = 0.1
    # NT-Xent (losses.ntxent): SimCLR's --hidden_norm, and 'paper' (L) or 'official' (2 L =
    # google-research/simclr's loss_a + loss_b, whose LARS steps on BN/bias are twice ours).
    loss.hidden_norm = True
    loss.scale = "paper"
    config.loss = loss


def projection_head_fields(*, version: bool = True) -> mlc.ConfigDict:
    """`config.head`: the projection head's widths (and, for SimCLR's head, its version)."""
    head = mlc.ConfigDict()
    if version:
        head.version = "v1"  # v1: 2 layers (Azizi/SimCLR v1); v2: 3 layers
    head.hidden_dim = -1  # -1 = the encoder's feature width (SimCLR: 2048 * width)
    head.out_dim = 128
    return head


def check_config(config) -> None:
    if config.loss.scale not in LOSS_SCALES:
        raise ValueError(f"config.loss.scale={config.loss.scale!r}: is not 'paper' or 'official'")


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


def init(model: nn.Module, rng: jax.Array, batch: dict, config, inputs=None) -> tuple[dict, Any]:
    del inputs  # no Method.init_inputs: a pretraining run's init reads only its config
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


METHOD = Method(data_spec=data_spec, build=build, init=init, loss_fn=loss_fn, extend_config=extend_config,
                check_config=check_config)
