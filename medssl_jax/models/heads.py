"""Heads that sit on an encoder's pooled features: SimCLR, SwAV and DINO projection heads, DINO's
weight-normalised prototype layer and a linear classifier (L2 normalisation: medssl_jax/numerics.py).

The projection head follows google-research/simclr `model_util.projection_head`: every Dense is bias-free
because a BatchNorm follows it (`linear_layer` drops the bias when `use_bn`), kernels start from
N(0, 0.01), hidden layers are Dense -> BN(centre + scale) -> ReLU, and the output layer is Dense -> BN with
a scale but no centre (beta). SimCLR v1 (Azizi et al.) has one hidden layer; SimCLR v2 has two.
BatchNorm modules are named `bn*` for the optimiser's path rule (see `medssl_jax.optim`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medssl_jax.models.resnet import BN_EPSILON, BN_MOMENTUM
from medssl_jax.numerics import l2_normalize

HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)
# PyTorch nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)), which SwAV's head and DINO's
# weight-normalised last layer keep.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# DINO initialises its head's Linear layers with trunc_normal(std=0.02) and zero biases.
TRUNC_NORMAL_02 = nn.initializers.truncated_normal(0.02)



# Number of Dense layers of each SimCLR head version.
PROJECTION_LAYERS = {"v1": 2, "v2": 3}


class ProjectionHead(nn.Module):
    """SimCLR projection head.

    Attributes:
      version: 'v1' (Dense-BN-ReLU-Dense-BN, SimCLR v1 / Azizi) or 'v2' (one more hidden layer).
      hidden_dim: width of the hidden layers; None means the input feature width (SimCLR's choice,
        2048 * width for ResNet-50).
      out_dim: projection size (128).
      dtype: computation dtype; parameters are float32.

    Call: `(z [B, out_dim] float32, out_dict)` with 'hidden1'.. (after each ReLU) and 'projection'.
    """

    version: str = "v1"
    hidden_dim: int | None = None
    out_dim: int = 128
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.version not in PROJECTION_LAYERS:
            raise ValueError(f"ProjectionHead version={self.version!r} is not one of {sorted(PROJECTION_LAYERS)}")
        num_layers = PROJECTION_LAYERS[self.version]
        hidden_dim = self.hidden_dim or x.shape[-1]
        out = {}
        for layer in range(1, num_layers + 1):
            is_output = layer == num_layers
            x = nn.Dense(
                self.out_dim if is_output else hidden_dim,
                use_bias=False,
                kernel_init=HEAD_KERNEL_INIT,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"dense{layer}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                use_bias=not is_output,  # SimCLR: center=False on the output BN
                use_scale=True,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"bn{layer}",
            )(x)
            if not is_output:
                x = nn.relu(x)
                out[f"hidden{layer}"] = x
        z = x.astype(jnp.float32)
        out["projection"] = z
        return z, out


class LinearClassifier(nn.Module):
    """Dense layer with bias on (frozen or fine-tuned) features, computed in float32.

    Kernel N(0, 0.01) and zero bias as SimCLR's supervised head. Call: `(logits [B, num_classes], out_dict)`.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train  # no train-time behaviour; the argument keeps the heads' call signatures alike
        logits = nn.Dense(
            self.num_classes,
            kernel_init=HEAD_KERNEL_INIT,
            bias_init=nn.initializers.zeros,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="dense",
        )(x.astype(jnp.float32))
        return logits, {"logits": logits}


class SwAVHead(nn.Module):
    """SwAV projection head: Linear(hidden) -> BN -> ReLU -> Linear(out), both Linear with bias."""

    hidden_dim: int | None = 2048  # None: the input width; 0: a single Linear
    out_dim: int = 128
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x, *, train: bool):
        out = {}
        hidden_dim = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
        dense = dict(kernel_init=TORCH_LINEAR_INIT, dtype=self.dtype, param_dtype=jnp.float32)
        if hidden_dim:
            x = nn.Dense(hidden_dim, name="dense1", **dense)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                             dtype=self.dtype, param_dtype=jnp.float32, name="bn1")(x)
            x = nn.relu(x)
            out["hidden1"] = x
        x = nn.Dense(self.out_dim, name="dense2", **dense)(x)
        z = x.astype(jnp.float32)
        out["projection"] = z
        return z, out


class WeightNormDense(nn.Module):
    """Bias-free Linear with weight normalisation (torch.nn.utils.weight_norm, dim=0).

    kernel v [in, K]; every output unit k uses w_k = g_k v_k / ||v_k|| (column norm). g is 1 and not a
    parameter when `fixed_scale` (DINO's norm_last_layer=True), else a parameter 'scale' [K] starting
    at 1. Computed in float32 so the loss sees exact unit-norm prototypes.
    """

    features: int
    fixed_scale: bool = True

    @nn.compact
    def __call__(self, x):
        v = self.param("kernel", TORCH_LINEAR_INIT, (x.shape[-1], self.features), jnp.float32)
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if not self.fixed_scale:
            w = w * self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        return x.astype(jnp.float32) @ w


class DINOHead(nn.Module):
    """DINO's projection head: (num_layers - 1) x [Linear, GELU] -> Linear(bottleneck) -> L2 norm ->
    weight-normalised Linear(K). Returns (logits [..., K] float32, out_dict with 'bottleneck')."""

    num_prototypes: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False  # DINO's use_bn_in_head: Linear -> BatchNorm -> GELU in the hidden layers
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.num_layers < 1:
            raise ValueError(f"DINOHead num_layers={self.num_layers} must be at least 1")
        dense = dict(kernel_init=TRUNC_NORMAL_02, bias_init=nn.initializers.zeros, dtype=self.dtype,
                     param_dtype=jnp.float32)
        for i in range(self.num_layers - 1):
            x = nn.Dense(self.hidden_dim, name=f"mlp_{i}", **dense)(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                 param_dtype=jnp.float32, name=f"bn_{i}")(x)
            x = nn.gelu(x, approximate=False)
        x = nn.Dense(self.bottleneck_dim, name=f"mlp_{self.num_layers - 1}", **dense)(x)
        z = l2_normalize(x.astype(jnp.float32))
        logits = WeightNormDense(self.num_prototypes, fixed_scale=self.norm_last_layer, name="last_layer")(z)
        return logits, {"bottleneck": z}


class Classifier(nn.Module):
    """Encoder + linear head on its pooled features (fine-tuning); returns (logits, out_dict) like every model
    here. The encoder is the submodule 'encoder', so exports and `config.init` treat it like a method's."""

    encoder: nn.Module
    num_labels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        features, encoder_out = self.encoder(x, train=train)
        logits, _ = LinearClassifier(self.num_labels, name="head")(features)
        return logits, {"encoder": encoder_out, "features": features, "logits": logits}
