"""Collapse monitors of the clustering methods: statistics computed inside the jitted step (returned as
metrics) and the host-side checks the train loop calls every log step (`check_health` of a method).

A run has collapsed when its targets no longer depend on the image: SwAV's codes all peak at one
prototype, turn uniform, or its embeddings stop spreading; DINO's teacher puts every sample on one
prototype, or is uniform and the student already matches it. Thresholds are on entropies divided by
ln K, so they do not depend on the number of prototypes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MIN_SAMPLES = 8  # below this a single prototype can win by chance

# SwAV
SWAV_COLLAPSE_TOP_PROTOTYPE_FRACTION = 0.9  # share of samples whose code peaks at the commonest prototype
SWAV_COLLAPSE_EMBEDDING_STD = 0.01  # spread of the normalised embeddings over the batch (~1 when healthy)
SWAV_COLLAPSE_CODE_ENTROPY = 0.995  # mean code entropy / ln K: uniform codes give no gradient (loss = ln K)

# DINO
DINO_COLLAPSE_UNIFORM_ENTROPY = 0.98  # per-sample teacher entropy this close to ln K: uniform teacher ...
DINO_COLLAPSE_UNIFORM_KL = 0.01  # ... that the student already matches (KL < this x ln K): nothing left to learn
DINO_COLLAPSE_ONE_PROTOTYPE_FRACTION = 0.95  # share of samples whose teacher argmax is the most common one
DINO_COLLAPSE_MARGINAL_ENTROPY = 0.05  # entropy of the batch-mean teacher distribution: (near) one prototype


def entropy(p: jax.Array) -> jax.Array:
    """Entropy (nats) of the distributions on the last axis."""
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def top_prototype(assigned: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(share of the samples assigned to the commonest prototype, number of prototypes used) for integer
    assignments [N] in [0, k); a bincount, not an [N, K] one-hot: K is 65536 in DINO."""
    counts = jnp.bincount(assigned, length=k)
    return jnp.max(counts) / assigned.shape[0], jnp.sum(counts > 0).astype(jnp.float32)


def swav_stats(scores, codes, z, crops_for_assign) -> dict:
    """SwAV's collapse statistics over the assignment crops (see `swav_check`): scores [B, V, K], the
    codes of each assignment crop [B, K], the normalised embeddings z [B, V, D]."""
    k = scores.shape[-1]
    q = jnp.concatenate(codes)
    code_top, prototypes_used = top_prototype(jnp.argmax(q, axis=-1), k)
    nearest_top, _ = top_prototype(jnp.concatenate([jnp.argmax(scores[:, a], axis=-1) for a in crops_for_assign]), k)
    code_entropy = entropy(q)
    # Mean over the batch of the per-dimension std of the normalised embeddings, times sqrt(dim):
    # about 1 for embeddings spread over the sphere, 0 when every sample maps to one point.
    za = jnp.concatenate([z[:, a] for a in crops_for_assign])
    return {
        "swav/top_prototype_fraction": code_top,  # share of samples whose code's argmax is the commonest
        "swav/prototypes_used": prototypes_used,  # distinct argmax prototypes of the codes
        "swav/nearest_prototype_fraction": nearest_top,  # same for the nearest prototype (before Sinkhorn)
        "swav/code_entropy": jnp.mean(code_entropy) / math.log(k),
        "swav/embedding_std": jnp.mean(jnp.std(za, axis=0)) * math.sqrt(za.shape[-1]),
        "swav/samples": jnp.float32(q.shape[0]),
        "swav/num_prototypes": jnp.float32(k),
    }


def swav_check(metrics, *, step) -> str | None:
    """A message when the run has collapsed or the loss is not finite, else None.

    Collapse is: nearly every sample's code (its Sinkhorn assignment) peaking at one prototype, codes
    that are uniform over the prototypes (the scores hardly differ between prototypes: the loss sits at
    ln K and its gradient vanishes), or no spread of the normalised embeddings over the batch. Embeddings
    that merely crowd near one prototype (`nearest_prototype_fraction` high) are not flagged: Sinkhorn
    removes that common component and the codes can still separate the samples.
    """
    loss = float(metrics["loss"])
    top = float(metrics["swav/top_prototype_fraction"])
    spread = float(metrics["swav/embedding_std"])
    samples = int(metrics["swav/samples"])
    stats = (f"loss={loss:.4g}, top_prototype_fraction={top:.3f} of {samples} samples, "
             f"prototypes_used={float(metrics['swav/prototypes_used']):.0f}, embedding_std={spread:.3g}, "
             f"code_entropy={float(metrics['swav/code_entropy']):.3f}")
    if not math.isfinite(loss):
        return f"SwAV loss is not finite at step {step} ({stats})"
    if samples >= MIN_SAMPLES and top > SWAV_COLLAPSE_TOP_PROTOTYPE_FRACTION:
        return f"SwAV collapse at step {step}: nearly all samples are assigned to one prototype ({stats})"
    if spread < SWAV_COLLAPSE_EMBEDDING_STD:
        return f"SwAV collapse at step {step}: every sample has the same embedding ({stats})"
    if float(metrics["swav/code_entropy"]) > SWAV_COLLAPSE_CODE_ENTROPY:
        return (f"SwAV collapse at step {step}: the codes are uniform over the prototypes (the scores "
                f"hardly differ), so the loss sits at ln K = {math.log(float(metrics['swav/num_prototypes'])):.3f} "
                f"with no gradient; small batches need the queue (swav.queue_length), and K should exceed "
                f"head.out_dim ({stats})")
    return None


def dino_stats(stats: dict) -> dict:
    """DINO's collapse statistics (see `dino_check`) from `dino_loss`'s stats: the teacher probabilities
    [B, G, K], the per-pair cross-entropies and the pair mask."""
    t = stats["teacher_probs"]  # [B, G, K]
    k = t.shape[-1]
    log_k = math.log(k)
    flat = t.reshape(-1, k)
    top, used = top_prototype(jnp.argmax(flat, axis=-1), k)
    pairs = stats["pairs"]
    kl = stats["ce"] - entropy(t)[:, :, None]  # KL(t || s) per pair: cross-entropy minus the teacher entropy
    return {
        "dino/teacher_entropy": jnp.mean(entropy(t)) / log_k,
        "dino/marginal_entropy": entropy(jnp.mean(flat, axis=0)) / log_k,
        "dino/kl": jnp.sum(jnp.mean(kl, axis=0) * pairs) / jnp.sum(pairs),
        "dino/top_prototype_fraction": top,
        "dino/prototypes_used": used,
        "dino/samples": jnp.float32(flat.shape[0]),
        "dino/num_prototypes": jnp.float32(k),
    }


def dino_check(metrics, *, step) -> str | None:
    """A message when the teacher has collapsed (one prototype for every sample, or uniform), else None.

    Not checked before `dino.health_check_after_steps`: at initialisation every image can land on the
    same prototype until the centre has caught up with the mean teacher output.
    """
    if float(metrics.get("dino/health_check", 1.0)) < 0.5:
        return None
    k = float(metrics["dino/num_prototypes"])
    teacher_entropy = float(metrics["dino/teacher_entropy"])
    marginal = float(metrics["dino/marginal_entropy"])
    top = float(metrics["dino/top_prototype_fraction"])
    samples = int(metrics["dino/samples"])
    stats = (f"loss={float(metrics['loss']):.4g}, teacher entropy={teacher_entropy:.3f} ln K, batch-marginal entropy="
             f"{marginal:.3f} ln K, KL(teacher||student)={float(metrics['dino/kl']):.3g}, top prototype "
             f"fraction={top:.3f} of {samples} samples, prototypes used={float(metrics['dino/prototypes_used']):.0f}"
             f" of K={k:.0f}")
    if teacher_entropy > DINO_COLLAPSE_UNIFORM_ENTROPY and float(metrics["dino/kl"]) < DINO_COLLAPSE_UNIFORM_KL * math.log(k):
        return (f"DINO collapse at step {step}: the teacher output is uniform over the prototypes and the "
                f"student matches it (the targets are too soft: lower dino.teacher_temp; if the head's output "
                f"barely depends on the input, as in short small-batch runs, try dino.centering=sinkhorn_knopp, "
                f"dino.use_bn_in_head=True or a lower dino.momentum_teacher) ({stats})")
    # The argmax of a (near-)uniform teacher is arbitrary, so the top-prototype share alone proves nothing:
    # one-prototype collapse needs the batch's mean teacher distribution itself concentrated.
    if samples >= MIN_SAMPLES and top > DINO_COLLAPSE_ONE_PROTOTYPE_FRACTION and marginal < DINO_COLLAPSE_MARGINAL_ENTROPY:
        return (f"DINO collapse at step {step}: the teacher puts every sample on one prototype (sharpening "
                f"dominates centring: raise dino.teacher_temp or lower dino.center_momentum) ({stats})")
    return None
