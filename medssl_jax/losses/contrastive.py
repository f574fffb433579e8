"""NT-Xent, SimCLR's normalised temperature-scaled cross-entropy, over the global batch.

Written as plain math over the full (global) arrays: under `jax.jit` with z1/z2 sharded over the batch
axis, every row's softmax still runs over all 2N views of the global batch and XLA inserts the all-gather
that google-research/simclr does by hand (`tpu_cross_replica_concat`). MICLe uses the same loss; only
the sampler changes what the two views of a row are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medssl_jax.numerics import l2_normalize

# SimCLR's LARGE_NUM: subtracted from a view's similarity with itself, so exp() of it is exactly 0.
SELF_SIMILARITY_MASK = 1e9


# tf.math.l2_normalize's epsilon (1e-12 on the squared norm), as google-research/simclr normalises.
TF_L2_EPS = 1e-6


def _gathered(x: jax.Array) -> jax.Array:
    """The full array on every device, for the column side of the similarity matrices.

    With Auto mesh axes (and on one device) XLA chooses the layout and this is a no-op. With Explicit
    mesh axes a [N@data] x [N@data]^T product has no legal output sharding, so the columns are
    all-gathered explicitly (SimCLR's cross-replica concat); the rows, and hence the logits, stay
    sharded over the batch.
    """
    sharding = jax.typeof(x).sharding
    if any(axis is not None for axis in sharding.spec):
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return x


SCALES = ("paper", "official")


def ntxent(*, z1: jax.Array, z2: jax.Array, temperature: float, hidden_norm: bool = True,
           scale: str = "paper") -> jax.Array:
    """The SimCLR loss L of Chen et al. (2020): mean over all 2N anchors of the NT-Xent term.

    For the 2N L2-normalised projections z (row i of z1 and row i of z2 are the positive pair),
        l(a, p) = -log( exp(z_a.z_p / t) / sum_{k != a} exp(z_a.z_k / t) ),
        L = 1/(2N) * sum_i [ l(z1_i, z2_i) + l(z2_i, z1_i) ].
    The denominator runs over the other 2N-1 views of the global batch (the positive and 2N-2
    negatives); each view's similarity with itself is masked out.

    Relation to google-research/simclr `objective.add_contrastive_loss`: it computes, in the same block
    structure as below, loss_a (anchors from the first view, logits [ab | aa - 1e9 I]) and loss_b (anchors
    from the second view, logits [ba | bb - 1e9 I]), each a mean over N anchors, and returns
    loss_a + loss_b. So **official loss = 2 x ntxent(...)**, and official gradients = 2 x ours.
    The factor is not harmless under SimCLR's LARS: for adapted parameters (conv/dense kernels) the trust
    ratio cancels the gradient's scale except that wd * w now weighs twice as much relative to it, and the
    excluded parameters (BatchNorm, biases) take plain lr * g steps, i.e. half the official step. A
    training recipe that must match google-research/simclr's optimisation dynamics (same lr, wd) should
    minimise 2 * ntxent(...), which `scale='official'` returns; loss curves compare with the official
    logs after the same factor.

    Args:
      z1: [N, D] projections of the first view (global batch, may be sharded over N). Any float dtype.
      z2: [N, D] projections of the second view, same order.
      temperature: softmax temperature t (SimCLR default 0.1).
      hidden_norm: L2-normalise z first (SimCLR's `--hidden_norm`, default True); False uses raw dot
        products, as the official flag does.
      scale: 'paper' (L above, the mean over the 2N anchors) or 'official' (loss_a + loss_b = 2 L, the
        value and gradients of `add_contrastive_loss`).

    Returns:
      Scalar float32 loss, computed in float32 whatever the input dtype.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"ntxent: z1 and z2 must both be [N, D] with the same shape, got {z1.shape} and {z2.shape}")
    if scale not in SCALES:
        raise ValueError(f"ntxent: scale={scale!r} is not one of {list(SCALES)}")
    a, b = z1.astype(jnp.float32), z2.astype(jnp.float32)
    if hidden_norm:
        a, b = l2_normalize(a, eps=TF_L2_EPS), l2_normalize(b, eps=TF_L2_EPS)
    a_all, b_all = _gathered(a), _gathered(b)
    self_mask = SELF_SIMILARITY_MASK * jnp.eye(a.shape[0], dtype=jnp.float32)
    logits_ab = a @ b_all.T / temperature
    logits_aa = a @ a_all.T / temperature - self_mask
    logits_ba = b @ a_all.T / temperature
    logits_bb = b @ b_all.T / temperature - self_mask
    # The diagonal of logits_ab (== that of logits_ba), computed row-wise so it needs no gather.
    positive = jnp.sum(a * b, axis=1) / temperature
    loss_a = jnp.mean(jax.nn.logsumexp(jnp.concatenate([logits_ab, logits_aa], axis=1), axis=1) - positive)
    loss_b = jnp.mean(jax.nn.logsumexp(jnp.concatenate([logits_ba, logits_bb], axis=1), axis=1) - positive)
    return loss_a + loss_b if scale == "official" else (loss_a + loss_b) / 2
