"""Array helpers that both the losses and the models use (so neither imports the other)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize; tf.math.l2_normalize's
    epsilon=1e-12 on the squared norm is eps=1e-6 here).

    Written as x * rsqrt(max(||x||^2, eps^2)) so the gradient is finite at x = 0 (the norm's is NaN
    there), which a collapsed batch reaches: the collapse checks must get to report it.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
