"""Online clustering losses: Sinkhorn-Knopp equipartition codes and the SwAV swapped-prediction loss.

Both are pure keyword-only functions over global arrays, written to match facebookresearch/swav
(`main_swav.py`: `distributed_sinkhorn` and the loss in `train()`). Under `jax.jit` with inputs sharded
over the batch axis, every sum over the batch axis below is a global sum and XLA inserts the
all-reduce that the PyTorch code does by hand (`dist.all_reduce` of the total and of the per-prototype
sums); the per-sample sums stay local. The same code therefore gives the same codes on 1 or N devices.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def sinkhorn(*, scores: jax.Array, epsilon: float = 0.05, num_iters: int = 3, valid: jax.Array | None = None) -> jax.Array:
    """Soft equipartitioned cluster assignments (codes) of a batch, as in SwAV's `distributed_sinkhorn`.

    Q = exp(scores / epsilon)ᵀ is scaled to sum to 1, then `num_iters` times its prototype rows are
    normalised to 1/K and its sample columns to 1/B; the result is scaled so each sample's code sums to 1.

    The exponent is stabilised by doing the very same normalisations in log space (each sum becomes a
    logsumexp, which subtracts its max before exponentiating). Any constant shift of the exponent cancels
    in the normalisations, so this equals the reference in exact arithmetic, but no entry overflows
    (bf16/f32 with a large scores/epsilon) and no row or column underflows to all zeros (which gives NaN
    in the direct form). Computed in float32 whatever the input dtype.

    Args:
        scores: [B, K] scores of B samples (global batch, may be sharded over B) against K prototypes.
        epsilon: entropic regularisation (SwAV default 0.05); may be a traced scalar (DINOv2's teacher
            temperature schedule).
        num_iters: Sinkhorn iterations (SwAV default 3).
        valid: optional [B] booleans: only these samples take part (iBOT's masked patch tokens, a number
            that varies from batch to batch in a fixed-size array); the others get all-zero codes, and the
            valid ones exactly the codes of the valid rows alone (B = their count).

    Returns:
        float32 codes [B, K], each row summing to 1 (0 for invalid rows), wrapped in `stop_gradient`.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn: scores must be [batch, prototypes], got shape {scores.shape}")
    if isinstance(epsilon, (int, float)) and not epsilon > 0:  # a traced schedule value is checked by its config
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if num_iters < 1:
        raise ValueError(f"sinkhorn: num_iters must be >= 1, got {num_iters}")
    batch, num_prototypes = scores.shape
    # Kept [B, K] (the reference works on the transpose): axis 0 = samples, axis 1 = prototypes.
    log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
    if valid is None:
        keep = lambda q: q  # noqa: E731
        count = jnp.float32(batch)
    else:
        # Invalid rows hold a finite -1e30 (exp -> 0; -inf would give inf - inf in their own normalisation),
        # put back after every step that touches them.
        valid = jnp.asarray(valid, bool).reshape(batch, 1)
        keep = lambda q: jnp.where(valid, q, jnp.float32(-1e30))  # noqa: E731
        count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
        log_q = keep(log_q)
    log_q = log_q - jax.nn.logsumexp(log_q)  # Q /= sum(Q): a global sum
    log_k = jnp.log(jnp.float32(num_prototypes))
    log_b = jnp.log(count)
    for _ in range(num_iters):
        # Each prototype's total weight over the global batch -> 1/K (the all-reduced row sums).
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - log_k
        # Each sample's total weight -> 1/B (a per-sample sum: local to the sample's device).
        log_q = keep(log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - log_b)
    # Q *= B: every sample's code now sums to 1.
    codes = jnp.exp(log_q + log_b)
    return jax.lax.stop_gradient(codes if valid is None else jnp.where(valid, codes, 0.0))


def swav_loss(
        *,
        scores_per_crop: Sequence[jax.Array],
        codes_per_assign_crop: Sequence[jax.Array],
        temperature: float = 0.1,
        crops_for_assign: Sequence[int] = (0, 1),
) -> jax.Array:
    """SwAV swapped-prediction loss, averaged exactly as in `main_swav.py` `train()`.

    For each assignment crop a with codes q_a, the loss sums over every other crop v of
    -mean_batch(sum_k q_a * log_softmax(s_v / temperature)), divides by (V - 1) and averages over the
    assignment crops.

    Args:
        scores_per_crop: V arrays [B, K] of raw scores (z · prototypes, cosine similarities), one per crop,
            global crops first, in crop order.
        codes_per_assign_crop: one [B, K] code array (rows sum to 1, e.g. from `sinkhorn`) per entry of
            `crops_for_assign`, in the same order.
        temperature: softmax temperature tau (SwAV default 0.1).
        crops_for_assign: indices into `scores_per_crop` of the crops whose codes are used.

    Returns:
        float32 scalar loss.
    """
    num_crops = len(scores_per_crop)
    if num_crops < 2:
        raise ValueError(f"swav_loss: scores_per_crop needs at least 2 crops, got {num_crops}")
    if len(codes_per_assign_crop) != len(crops_for_assign):
        raise ValueError(
                f"swav_loss: codes_per_assign_crop has {len(codes_per_assign_crop)} entries but "
                f"crops_for_assign has {len(crops_for_assign)}")
    if not all(0 <= c < num_crops for c in crops_for_assign):
        raise ValueError(f"swav_loss: crops_for_assign {tuple(crops_for_assign)} out of range for "
                                          f"{num_crops} crops")
    shapes = {tuple(s.shape) for s in scores_per_crop} | {tuple(q.shape) for q in codes_per_assign_crop}
    if len(shapes) != 1:
        raise ValueError(f"swav_loss: scores and codes must all have one shape [B, K], got {sorted(shapes)}")
    log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1) for s in scores_per_crop]
    loss = jnp.float32(0.0)
    for crop_id, q in zip(crops_for_assign, codes_per_assign_crop):
        q = jax.lax.stop_gradient(q).astype(jnp.float32)
        subloss = jnp.float32(0.0)
        for v in range(num_crops):
            if v != crop_id:
                subloss -= jnp.mean(jnp.sum(q * log_probs[v], axis=-1))
        loss += subloss / (num_crops - 1)
    return loss / len(crops_for_assign)
