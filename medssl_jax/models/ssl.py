"""The assembled self-supervised models: an encoder with its method's heads, one call over all crops.

Every model returns (output, out_dict) like the encoders. `multicrop_features` runs each crop resolution
through the encoder as its own batch, so SwAV's and DINO's multi-crop keep fixed shapes.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medssl_jax.models import heads
from medssl_jax.numerics import l2_normalize


def multicrop_features(encoder, crops, *, train: bool, first_group: dict | None = None):
    """Runs each crop resolution through `encoder` as its own batch (fixed shapes, one compile each).

    crops: a tuple of [B, n_i, H_i, W_i, C] groups (or one [B, H, W, C] array); returns features
    [B, sum n_i, D] (a device-local concatenation: rows stay on their device) and the encoder's
    out_dict for the first group. `first_group`: extra encoder arguments for the first group only (iBOT's
    patch mask of the global crops).
    """
    if not isinstance(crops, (list, tuple)):
        crops = (crops[:, None],)
    features, encoder_out = [], {}
    for index, group in enumerate(crops):
        batch, num = group.shape[:2]
        f, out = encoder(group.reshape(batch * num, *group.shape[2:]), train=train,
                         **((first_group or {}) if index == 0 else {}))
        features.append(f.reshape(batch, num, -1))
        if index == 0:
            encoder_out = out
    return jnp.concatenate(features, axis=1), encoder_out


class SSLModel(nn.Module):
    """Encoder followed by a projection head; returns (z, out_dict) like every model here."""

    encoder: nn.Module
    head: nn.Module

    def __call__(self, x, *, train: bool):
        features, encoder_out = self.encoder(x, train=train)
        z, head_out = self.head(features, train=train)
        return z, {"encoder": encoder_out, "features": features, "head": head_out, "z": z}


class SwAVModel(nn.Module):
    """Encoder + SwAV head + normalisation + prototypes (+ a linear classifier for the hybrid).

    Call with a sequence of crop groups, each [B, n_i, H_i, W_i, C] (one backbone call per group), or
    one [B, H, W, C] array. Returns (scores [B, V, K], out_dict) with 'features' [B, V, D] (encoder),
    'z' [B, V, out_dim] (normalised), 'scores' and, with a classifier, 'logits' [B, V, L].
    """

    encoder: nn.Module
    head: nn.Module
    num_prototypes: int
    num_labels: int = 0
    contrastive_head: nn.Module | None = None  # hybrid 'separate': a projection head for NT-Xent

    @nn.compact
    def __call__(self, crops, *, train: bool):
        features, encoder_out = multicrop_features(self.encoder, crops, train=train)
        z, head_out = self.head(features, train=train)
        z = l2_normalize(z)
        scores = nn.Dense(self.num_prototypes, use_bias=False, kernel_init=heads.TORCH_LINEAR_INIT,
                          dtype=jnp.float32, param_dtype=jnp.float32, name="prototypes")(z)
        out = {"encoder": encoder_out, "features": features, "head": head_out, "z": z, "scores": scores}
        if self.contrastive_head is not None:
            glob = features[:, :2]  # the two global crops
            zc, _ = self.contrastive_head(glob.reshape(-1, glob.shape[-1]), train=train)
            out["contrastive_z"] = zc.reshape(glob.shape[0], 2, -1)
        if self.num_labels:
            out["logits"], _ = heads.LinearClassifier(self.num_labels, name="classifier")(features)
        return scores, out


class DINOModel(nn.Module):
    """Backbone + DINO head over crop groups.

    Call with a sequence of crop groups, each [B, n_i, H_i, W_i, C] (one backbone call per group), or
    one [B, H, W, C] array. Returns (logits [B, V, K], out_dict) with 'features' [B, V, D] (backbone
    pre_logits) and 'encoder' (the backbone's out_dict of the first group).
    """

    encoder: nn.Module
    head: nn.Module
    ibot: bool = False  # a learned mask token (DINOv2's, zeros at init) for the student's masked patches

    @nn.compact
    def __call__(self, crops, *, train: bool, masks=None, patch_index=None):
        """`masks` [B * 2, N]: patches of the global crops replaced by the mask token; `patch_index` [B * 2, M]:
        the patch tokens of the global crops that also go through the head ('patch_logits' [B * 2, M, K])."""
        first = {}
        if self.ibot:
            token = self.param("mask_token", nn.initializers.zeros, (self.encoder.arch()["width"],), jnp.float32)
            if masks is not None:
                first = {"mask": masks, "mask_token": token}
        features, encoder_out = multicrop_features(self.encoder, crops, train=train, first_group=first)
        logits, head_out = self.head(features, train=train)
        out = {"encoder": encoder_out, "features": features, "head": head_out, "logits": logits}
        if patch_index is not None:
            tokens = jnp.take_along_axis(encoder_out["patch_tokens"], patch_index[..., None], axis=1)
            out["patch_logits"], _ = self.head(tokens, train=train)
        return logits, out
