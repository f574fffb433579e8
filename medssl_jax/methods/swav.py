"""SwAV (online feature clustering) and the Ghesu et al. 2022 hybrid, with multi-crop.

'swav' follows facebookresearch/swav (`main_swav.py`, `src/resnet50.py`):
- encoder -> projection head Linear(D, 2048) -> BN -> ReLU -> Linear(2048, 128) -> L2 normalisation ->
  bias-free prototypes Linear(128, K); the prototype vectors are re-L2-normalised after every update
  (and at initialisation, so every step sees unit prototypes, as the reference's normalise-before-step);
- multi-crop: each resolution goes through the backbone in its own call, the features of all crops then
  go through the head together (its BatchNorm sees every crop, as in `forward_head(torch.cat(...))`);
- codes only from the assignment crops (the global crops), by Sinkhorn on exp(scores / epsilon), without
  gradient; swapped prediction over all other crops at temperature tau (`losses.clustering`);
- the prototypes get no update for the first `freeze_prototypes_steps` steps;
- an optional queue of past embeddings of the assignment crops: filled from `queue_start_steps`, and once
  full its scores are prepended before Sinkhorn and only the current batch's codes are kept. It lives in
  `method_state`, so it is checkpointed with the run.

'hybrid' (Ghesu et al.: "contrastive learning and online feature clustering ... with optional
supervision") adds, with weights that are config fields because the paper's values are not public:
  loss = L_swav + contrastive_weight * NT-Xent(z of global crop 1, z of global crop 2)
              + supervised_weight * BCE(linear head on the global crops' encoder features, labels)
NT-Xent (`losses.ntxent`: the paper's L, half of google-research/simclr's loss_a + loss_b) uses the same
normalised z (SimCLR temperature 0.1 by default); MICLe-style patient positives
come from the sampler (`config.data.sampler = 'micle'`: the two global crops are two images of one
patient). The supervised term uses only the labels that are present (NaN = missing is masked out).

Layout: every crop group stays [B, n, ...] with the batch axis first, so the data-parallel sharding over
B never has to move data between devices to form crops; the per-crop scores are [B, V, K].

Modality-aware intensities (`config.intensity`, medssl_jax/intensity.py) map each crop to [0, 1] by its
modality before the photometric augmentation: CT through a window preset sampled per crop (lung / soft
tissue / bone), MR by per-crop percentiles, X-ray and everything else as stored.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from medssl_jax import augment, intensity, losses, models, numerics
from medssl_jax.losses.clustering import sinkhorn, swav_loss
from medssl_jax.methods import Method, check_crops, health, multicrop_spec
from medssl_jax.models import heads
from medssl_jax.methods.simclr import projection_head_fields
from medssl_jax.models.ssl import SwAVModel

# --------------------------------------------------------------------------------------------- config


def extend_config(config: mlc.ConfigDict) -> None:
    """Adds the SwAV (and, for method 'hybrid', hybrid) fields with the SwAV/SimCLR defaults.

    The loss temperature is `loss.temperature` (SwAV: 0.1); the projection sizes are `head.hidden_dim` (-1 =
    the encoder width: 2048 for ResNet-50, as SwAV) and `head.out_dim` (128); the global crops are
    `data.image_size` / `data.crop_scale` (SwAV: 224, (0.14, 1.0)).
    """
    config.head = projection_head_fields(version=False)
    config.loss = mlc.ConfigDict({"temperature": 0.1})
    s = mlc.ConfigDict()
    s.num_prototypes = 3000  # K
    s.epsilon = 0.05  # Sinkhorn entropic regularisation
    s.sinkhorn_iters = 3
    s.crops_for_assign = (0, 1)  # crops whose codes are predicted (the two global crops)
    # SwAV's durations in epochs of the train split (-1 steps = use the epochs; a step count >= 0 wins):
    # prototypes frozen for 1 epoch (its 313 iterations at batch 4096, 5005 at 256), queue from epoch 15.
    s.freeze_prototypes_steps = -1
    s.freeze_prototypes_epochs = 1.0
    s.queue_length = 0  # 0 = no queue; SwAV uses 3840 at batch 256; rounded down to a multiple of the batch
    s.queue_start_steps = -1
    s.queue_start_epochs = 15.0
    s.num_local_crops = 6  # multi-crop: 2 x data.image_size + num_local_crops x local_image_size
    s.local_image_size = 96
    s.local_crop_scale = (0.05, 0.14)
    config.swav = s

    config.intensity = intensity.config_fields()
    if _is_hybrid(config):
        add_hybrid_fields(config)


def add_hybrid_fields(config: mlc.ConfigDict) -> None:
    """`config.hybrid`: the NT-Xent and supervised terms Ghesu et al. add to SwAV (method 'hybrid')."""
    h = mlc.ConfigDict()
    h.contrastive_weight = 1.0  # lambda_c: paper value not public
    h.contrastive_temperature = 0.1  # SimCLR default
    # Where NT-Xent reads its embeddings (the paper does not say): 'shared' = SwAV's normalised z, the input
    # of the prototypes; 'separate' = a SimCLR v1 projection head of its own on the encoder features of the
    # global crops (hybrid.contrastive_out_dim wide), so the two objectives meet only in the backbone.
    h.contrastive_head = "shared"
    h.contrastive_out_dim = 128
    h.supervised_weight = 0.0  # alpha: paper value not public; > 0 needs labels in the batch
    h.num_labels = 0  # the store's label count (needed when supervised_weight > 0)
    h.pos_weight = ()  # BCE pos_weight per label ((N - P) / P on the train split); () = 1
    config.hybrid = h


def _is_hybrid(config) -> bool:
    return config.method == "hybrid"


def _supervised(config) -> bool:
    return _is_hybrid(config) and config.hybrid.supervised_weight > 0


def data_spec(config) -> dict:
    """What the pipeline must produce: 2 global crops (+ local crops) per element, and the per-sample
    fields the loss reads (labels for the supervised term, modality fields for intensity handling)."""
    crops = multicrop_spec(config, num_local=config.swav.num_local_crops, local_size=config.swav.local_image_size,
                           local_scale=config.swav.local_crop_scale)
    fields = []
    if _supervised(config):
        fields.append("labels")
    if config.intensity.modality_aware:
        fields += ["modality_id", "bits_stored", "intensity_offset"]
    return {"sampler": config.data.sampler, "crops": crops, "fields": fields}


def build(config) -> nn.Module:
    encoder = models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype})
    hidden = config.head.hidden_dim
    head = heads.SwAVHead(hidden_dim=hidden if hidden >= 0 else None, out_dim=config.head.out_dim,
                    dtype=jnp.dtype(config.compute_dtype))
    num_labels = config.hybrid.num_labels if _supervised(config) else 0
    if _supervised(config) and num_labels <= 0:
        raise ValueError("config.hybrid.num_labels must be the store's label count when "
                         f"hybrid.supervised_weight={config.hybrid.supervised_weight} > 0")
    contrastive_head = None
    if _is_hybrid(config) and config.hybrid.contrastive_weight:
        if config.hybrid.contrastive_head not in ("shared", "separate"):
            raise ValueError(f"config.hybrid.contrastive_head={config.hybrid.contrastive_head!r} is not one of "
                             "['separate', 'shared']")
        if config.hybrid.contrastive_head == "separate":
            contrastive_head = heads.ProjectionHead(version="v1", hidden_dim=hidden if hidden > 0 else None,
                                                    out_dim=config.hybrid.contrastive_out_dim,
                                                    dtype=jnp.dtype(config.compute_dtype))
    return SwAVModel(encoder=encoder, head=head, num_prototypes=config.swav.num_prototypes,
                     num_labels=num_labels, contrastive_head=contrastive_head)


def queue_length(config) -> int:
    """The queue length actually used: a multiple of the global batch, as in SwAV."""
    length = int(config.swav.queue_length)
    return length - length % int(config.batch_size)


def normalize_prototypes(params: dict) -> dict:
    """Re-L2-normalises every prototype vector (a column of the Dense kernel [out_dim, K])."""
    kernel = params["prototypes"]["kernel"]
    return {**params, "prototypes": {**params["prototypes"], "kernel": numerics.l2_normalize(kernel.T).T}}


def init(model: nn.Module, rng: jax.Array, batch: dict, config, inputs=None) -> tuple[dict, Any]:
    del inputs  # no Method.init_inputs: a pretraining run's init reads only its config
    for field in ("freeze_prototypes_steps", "queue_start_steps"):
        if config.swav[field] < 0:  # the train loop resolves epochs first; a direct caller must too
            raise ValueError(f"config.swav.{field}={config.swav[field]}: epochs not yet turned into steps "
                             "(config_lib.resolve_durations)")
    crops = tuple(jnp.zeros((1, 1, *batch[c["name"]].shape[2:]), jnp.float32) for c in data_spec(config)["crops"])
    variables = dict(model.init(rng, crops, train=True))
    variables["params"] = normalize_prototypes(variables["params"])
    length = queue_length(config)
    method_state = {}
    if length > 0:
        num_assign = len(config.swav.crops_for_assign)
        method_state["queue"] = jnp.zeros((num_assign, length, config.head.out_dim), jnp.float32)
    return variables, method_state


def augmented_crops(batch: dict, *, rng: jax.Array, config) -> tuple[jax.Array, ...]:
    """Every crop group of the batch -> float32 [B, n, H, W, C] after intensity handling and the
    device-side photometric augmentation (independent randomness per group and per crop)."""
    groups = []
    crops = data_spec(config)["crops"]
    check_crops(batch, crops)
    for index, crop in enumerate(crops):
        views = batch[crop["name"]]
        k_intensity, k_augment = jax.random.split(jax.random.fold_in(rng, index))
        unit = intensity.crops_to_unit(views, batch, rng=k_intensity, cfg=config.intensity)
        groups.append(augment.augment_views(unit, rng=k_augment, cfg=config.augment))
    return tuple(groups)


# --------------------------------------------------------------------------------------------- loss


def _codes(scores_a: jax.Array, queue_a: jax.Array | None, prototypes: jax.Array, *, step, config):
    """Sinkhorn codes of one assignment crop, with the queue's scores prepended once it is full."""
    run = lambda s: sinkhorn(scores=s, epsilon=config.swav.epsilon, num_iters=config.swav.sinkhorn_iters)
    if queue_a is None:
        return run(scores_a), jnp.bool_(False)
    batch = scores_a.shape[0]
    # SwAV uses the queue from the step its last row is filled (it fills from the front).
    use = (step >= config.swav.queue_start_steps) & jnp.any(queue_a[-1] != 0)
    with_queue = lambda: run(jnp.concatenate([queue_a @ jax.lax.stop_gradient(prototypes), scores_a]))[-batch:]
    return jax.lax.cond(use, with_queue, lambda: run(scores_a)), use


def loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config):
    crops = augmented_crops(batch, rng=rng, config=config)
    (scores, out), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, crops, train=True, mutable=["batch_stats"]
    )
    batch_size, num_crops = scores.shape[:2]
    crops_for_assign = tuple(config.swav.crops_for_assign)
    if any(not 0 <= a < 2 for a in crops_for_assign):
        raise ValueError(f"config.swav.crops_for_assign={crops_for_assign}: only the 2 global crops (0, 1) "
                         "can be assignment crops")
    z = jax.lax.stop_gradient(out["z"])

    queue = method_state.get("queue")
    codes, queue_used = [], []
    for i, a in enumerate(crops_for_assign):
        q, used = _codes(scores[:, a], None if queue is None else queue[i], params["prototypes"]["kernel"],
                         step=step, config=config)
        codes.append(q)
        queue_used.append(used)
    swav = swav_loss(scores_per_crop=[scores[:, v] for v in range(num_crops)], codes_per_assign_crop=codes,
                     temperature=config.loss.temperature, crops_for_assign=crops_for_assign)

    new_state = dict(method_state)
    if queue is not None:
        # Newest embeddings first, the oldest B fall off the end (SwAV's queue[i, bs:] = queue[i, :-bs]).
        filled = jnp.stack([jnp.concatenate([z[:, a], queue[i, :-batch_size]]) for i, a in enumerate(crops_for_assign)])
        new_state["queue"] = jnp.where(step >= config.swav.queue_start_steps, filled, queue)

    loss = swav
    metrics = {"swav_loss": swav}
    if _is_hybrid(config):
        h = config.hybrid
        if h.contrastive_weight:
            zc = out.get("contrastive_z", out["z"])
            contrastive = losses.ntxent(z1=zc[:, 0], z2=zc[:, 1], temperature=h.contrastive_temperature)
            loss = loss + h.contrastive_weight * contrastive
            metrics["contrastive_loss"] = contrastive
        if h.supervised_weight > 0:
            supervised, labelled = _supervised_loss(out["logits"][:, :2], batch, config)
            loss = loss + h.supervised_weight * supervised
            metrics["supervised_loss"] = supervised
            metrics["labelled_fraction"] = labelled
    metrics["loss"] = loss
    metrics.update(health.swav_stats(scores, codes, z, crops_for_assign))
    if queue is not None:
        metrics["swav/queue_used"] = jnp.mean(jnp.stack(queue_used).astype(jnp.float32))
    return loss, (updates["batch_stats"], new_state, metrics)


def _supervised_loss(logits: jax.Array, batch: dict, config) -> tuple[jax.Array, jax.Array]:
    """BCE with pos_weight on the global crops' logits [B, 2, L]; NaN labels are masked out.

    batch['labels'] is [B, L] (one image per element) or [B, 2, L] (per global crop's source image, e.g.
    two images of one patient with the MICLe sampler)."""
    if "labels" not in batch:
        raise ValueError("config.hybrid.supervised_weight > 0 needs batch['labels'] [B, L] (NaN = missing)")
    labels = batch["labels"].astype(jnp.float32)
    if labels.ndim == 2:
        labels = labels[:, None]
    if labels.shape[0] != logits.shape[0] or labels.shape[-1] != logits.shape[-1] or labels.shape[1] not in (1, 2):
        raise ValueError(f"batch['labels'] has shape {batch['labels'].shape}, expected ({logits.shape[0]}, "
                         f"{logits.shape[-1]}) or ({logits.shape[0]}, 2, {logits.shape[-1]}) (config.hybrid.num_labels)")
    labels = jnp.broadcast_to(labels, logits.shape)
    pos_weight = jnp.asarray(config.hybrid.pos_weight or (1.0,), jnp.float32)
    pos_weight = jnp.broadcast_to(pos_weight, labels.shape[-1:])
    loss = losses.bce_with_pos_weight(logits=logits, labels=labels, pos_weight=pos_weight)  # NaN = excluded
    return loss, jnp.mean((~jnp.isnan(labels)).astype(jnp.float32))


# --------------------------------------------------------------------------------------------- train-loop hooks


def process_grads(grads, *, step, config):
    """Freezes the prototypes for the first `freeze_prototypes_steps` steps (SwAV sets their grad to None).

    With a zero gradient, weight decay (and LARS's trust ratio on it) can only scale each prototype
    along itself; `after_update` re-normalises, so the prototype directions stay exactly frozen.
    """
    frozen = step < config.swav.freeze_prototypes_steps
    prototypes = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g), grads["prototypes"])
    return {**grads, "prototypes": prototypes}


def after_update(params, method_state, *, step, config):
    """Re-normalises the prototypes after every update, so every step starts from unit prototypes."""
    del step, config
    return normalize_prototypes(params), method_state


check_health = health.swav_check

METHOD = Method(data_spec=data_spec, build=build, init=init, loss_fn=loss_fn, extend_config=extend_config,
                process_grads=process_grads, after_update=after_update, check_health=check_health)
