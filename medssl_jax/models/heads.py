"""Heads that sit on an encoder's pooled features: SimCLR projection heads and a linear classifier.

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

HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)

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
