"""DINO's and DINOv2's self-distillation losses (facebookresearch/dino `DINOLoss`, dinov2 `DINOLoss` and
`iBOTPatchLoss`): the teacher's targets (centring or Sinkhorn-Knopp), the student-teacher cross-entropy
over crop pairs, iBOT's masked-patch cross-entropy, and the centre's moving average. The method that
schedules them (temperatures, EMA teacher, multi-crop) is medssl_jax/methods/dino.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medssl_jax.losses.clustering import sinkhorn

CENTERINGS = ("centering", "sinkhorn_knopp")  # config.dino.centering: DINO's centre, DINOv2's Sinkhorn-Knopp


def teacher_targets(*, teacher_logits: jax.Array, center: jax.Array, teacher_temp,
                    centering: str = "centering", sinkhorn_iters: int = 3) -> jax.Array:
    """The teacher's target distributions [B, G, K] from its raw outputs [B, G, K].

    centering="centering" (DINO): softmax((teacher - centre) / T_t). centering="sinkhorn_knopp" (DINOv2's
    `sinkhorn_knopp_teacher`): Sinkhorn-Knopp equipartition of exp(teacher / T_t) over the global batch and
    both global crops together (the B*G rows), `sinkhorn_iters` iterations; the centre is not used. Under
    stop_gradient either way.
    """
    if teacher_logits.ndim != 3 or center.shape != teacher_logits.shape[-1:]:
        raise ValueError(f"teacher_targets: teacher {teacher_logits.shape} / centre {center.shape} do not fit "
                         "(need [B, G, K] and [K])")
    if centering == "sinkhorn_knopp":
        b, g, k = teacher_logits.shape
        t = sinkhorn(scores=teacher_logits.reshape(b * g, k), epsilon=teacher_temp,
                            num_iters=sinkhorn_iters).reshape(b, g, k)
    elif centering == "centering":
        t = jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / teacher_temp, axis=-1)
    else:
        raise ValueError(f"config.dino.centering={centering!r} is not one of {list(CENTERINGS)}")
    return jax.lax.stop_gradient(t)


def dino_loss(*, student_logits: jax.Array, teacher_probs: jax.Array, student_temp: float) -> tuple[jax.Array, dict]:
    """DINO's cross-entropy between the teacher's targets and the student's sharpened outputs.

    Args:
      student_logits: [B, V, K], crops in the order global 1, global 2, locals...
      teacher_probs: [B, G, K] targets for the G global crops (`teacher_targets`; the first G student crops
        are the same images).
      student_temp: the student's temperature.

    Returns:
      (loss, stats): loss = mean over pairs (i < G, v < V, v != i) of mean_b -sum_k t[b,i,k] log s[b,v,k];
      stats holds the teacher probabilities 'teacher_probs' [B, G, K], the per-pair cross-entropies 'ce'
      [B, G, V] and the pair mask 'pairs' [G, V].
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(f"dino_loss: logits must be [B, V, K], got student {student_logits.shape} and teacher "
                         f"{teacher_probs.shape}")
    b, v, k = student_logits.shape
    g = teacher_probs.shape[1]
    if teacher_probs.shape[0] != b or teacher_probs.shape[2] != k or g > v:
        raise ValueError(f"dino_loss: teacher {teacher_probs.shape} does not fit student {student_logits.shape} "
                         "(need [B, G<=V, K])")
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    t = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    ce = -jnp.einsum("bik,bvk->biv", t, log_s)
    pairs = jnp.arange(g)[:, None] != jnp.arange(v)[None, :]
    loss = jnp.sum(jnp.mean(ce, axis=0) * pairs) / jnp.sum(pairs)
    return loss, {"teacher_probs": t, "ce": ce, "pairs": pairs}


def ibot_loss(*, student_logits: jax.Array, teacher_probs: jax.Array, valid: jax.Array,
              student_temp: float) -> jax.Array:
    """DINOv2's iBOT patch loss (`iBOTPatchLoss.forward_masked`): per crop, the cross-entropy -sum_k t log
    softmax(s / T_s) summed over its masked patches and divided by their number (at least 1), then the mean
    over all crops, masked or not. student_logits / teacher_probs [C, M, K], valid [C, M]."""
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.sum(jax.lax.stop_gradient(teacher_probs.astype(jnp.float32)) * log_s, axis=-1)
    valid = valid.astype(jnp.float32)
    per_crop = jnp.sum(ce * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return jnp.mean(per_crop)


def updated_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """center * m + (1 - m) * mean of the teacher outputs over the (global) batch and the global crops."""
    batch_center = jnp.mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]).astype(jnp.float32), axis=0)
    return center * momentum + batch_center * (1.0 - momentum)
