"""Supervised multi-label losses for fine-tuning and probes.

`bce_with_pos_weight` is PyTorch's `BCEWithLogitsLoss(pos_weight=...)` with reduction='mean' (the loss of
Tayebi Arasteh et al. and of our CheXpert-style fine-tuning), extended with a mask so missing labels
(NaN in the store) contribute nothing. `pos_weight_from_labels` is the (N-P)/P statistic those papers
compute once from the training split, on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bce_with_pos_weight(*, logits: jax.Array, labels: jax.Array, pos_weight: jax.Array | None = None,
                        mask: jax.Array | None = None) -> jax.Array:
    """Mean binary cross-entropy with logits, positives weighted by `pos_weight`.

    Per element: -[pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))], written with
    softplus so large |x| neither overflows nor loses precision (as torch does).

    Args:
      logits: [B, L] (any float dtype; computed in float32).
      labels: [B, L] targets in [0, 1]; NaN marks a missing label.
      pos_weight: [L] weight of the positive term per label (None = 1, plain BCE).
      mask: optional [B, L] (or broadcastable) bool/0-1 array, False/0 excludes an element. Elements whose
        label is NaN are excluded whether or not a mask is given.

    Returns:
      Scalar: the sum over included elements divided by their number (torch's 'mean' when nothing is
      excluded); 0 when every element is excluded.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"bce_with_pos_weight: logits {logits.shape} and labels {labels.shape} differ in shape")
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    included = ~jnp.isnan(y)
    if mask is not None:
        included = included & jnp.broadcast_to(jnp.asarray(mask).astype(bool), y.shape)
    y = jnp.where(included, y, 0.0)
    weight = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
    per_element = weight * y * jax.nn.softplus(-x) + (1.0 - y) * jax.nn.softplus(x)
    total = jnp.sum(jnp.where(included, per_element, 0.0))
    return total / jnp.maximum(jnp.sum(included), 1)


def pos_weight_from_labels(labels) -> np.ndarray:
    """(N - P) / P per label over the non-missing entries, for `bce_with_pos_weight`.

    Args:
      labels: [N, L] array of 0/1 labels (soft labels count fractionally), NaN = missing.

    Returns:
      float32 [L]. Raises ValueError naming the label column if it has no positive example, because the
      weight would be infinite and the label cannot be learned or evaluated from this split.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"pos_weight_from_labels: labels must be [N, L], got shape {labels.shape}")
    present = ~np.isnan(labels)
    num_present = present.sum(axis=0)
    num_positive = np.where(present, labels, 0.0).sum(axis=0)
    empty = np.flatnonzero(num_positive <= 0)
    if empty.size:
        raise ValueError(f"pos_weight_from_labels: label column(s) {empty.tolist()} have no positive example")
    return ((num_present - num_positive) / num_positive).astype(np.float32)
