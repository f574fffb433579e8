"""The KoLeo regulariser of DINOv2 (Oquab et al. 2023; Sablayrolles et al. 2019's Kozachenko-Leonenko
differential-entropy estimator), written to match facebookresearch/dinov2 `KoLeoLoss`.

It spreads L2-normalised features over the sphere by penalising each sample's distance to its nearest
neighbour in the batch. Under `jax.jit` with the batch sharded, the nearest neighbour is searched over the
global batch (DINOv2 searches each GPU's local batch).
"""

import jax
import jax.numpy as jnp


def koleo(*, features: jax.Array, eps: float = 1e-8) -> jax.Array:
    """-mean_i log(||x_i - x_nn(i) + 1e-8|| + eps) over L2-normalised rows x_i of `features` [B, D].

    nn(i) is the row with the largest inner product with x_i other than i itself (DINOv2 fills the
    diagonal of x xᵀ with -1; the nearest-neighbour index carries no gradient, the distance does). The
    1e-8 inside the norm is the eps DINOv2 gives torch.nn.PairwiseDistance, kept for parity. Computed in float32.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo: features must be [batch >= 2, dim], got shape {features.shape}")
    x = features.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = jax.lax.stop_gradient(x @ x.T)
    n = x.shape[0]
    dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
    nearest = jnp.argmax(dots, axis=1)
    distances = jnp.linalg.norm(x - x[nearest] + 1e-8, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))
