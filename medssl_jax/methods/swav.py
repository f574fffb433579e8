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

Modality-aware intensities (`modality_intensity`) map each crop to [0, 1] by its modality before the
photometric augmentation: CT through a window preset sampled per crop (lung / soft tissue / bone), MR by
per-crop percentiles, X-ray and everything else as stored.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from medssl_jax import augment, config_lib, losses, models
from medssl_jax.data.pipeline import MODALITY_CT, MODALITY_MR, MODALITY_OTHER, modality_id  # noqa: F401
from medssl_jax.losses.clustering import sinkhorn, swav_loss
from medssl_jax.methods import encoder_variables, multicrop_features, with_encoder_variables  # noqa: F401 (method interface)
from medssl_jax.models import heads
from medssl_jax.models.resnet import BN_EPSILON, BN_MOMENTUM

# PyTorch nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)), which SwAV's head keeps.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Collapse detection (check_health).
COLLAPSE_TOP_PROTOTYPE_FRACTION = 0.9  # share of samples whose code peaks at the commonest prototype
COLLAPSE_EMBEDDING_STD = 0.01  # spread of the normalised embeddings over the batch (~1 when healthy)
COLLAPSE_MIN_SAMPLES = 8  # below this a single prototype can win by chance
COLLAPSE_CODE_ENTROPY = 0.995  # mean code entropy / ln K: uniform codes give no gradient (loss = ln K)

# CT window presets (centre, width) in Hounsfield units.
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "mediastinum": (50.0, 350.0),
}


# --------------------------------------------------------------------------------------------- config


def extend_config(config: mlc.ConfigDict) -> None:
    """Adds the SwAV (and, for method 'hybrid', hybrid) fields with the SwAV/SimCLR defaults.

    The loss temperature is the base config's `loss.temperature` (SwAV: 0.1); the projection sizes are
    `head.hidden_dim` (-1 = the encoder width: 2048 for ResNet-50, as SwAV) and `head.out_dim` (128);
    the global crops are `data.image_size` / `data.crop_scale` (SwAV: 224, (0.14, 1.0)).
    """
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

    i = mlc.ConfigDict()
    i.modality_aware = False  # needs batch fields modality_id, bits_stored, intensity_offset
    i.ct_windows = ("lung", "soft_tissue", "bone")  # presets of CT_WINDOWS sampled per crop
    i.ct_window_probs = ()  # () = uniform
    i.ct_window_jitter = 0.0  # relative jitter of centre (by width) and width, e.g. 0.1
    i.mr_percentiles = (1.0, 99.0)
    config.intensity = i

    h = mlc.ConfigDict()  # read only when config.method == 'hybrid'
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


def ghesu_config(arg: str | None, *, method: str) -> mlc.ConfigDict:
    """The config of configs/swav.py ('swav') and configs/hybrid.py ('hybrid').

    SwAV's single-node recipe (`swav_200ep_bs256_pretrain.sh`, methods.md 1(c)) because Ghesu et al.'s
    values are not public: ResNet-50, batch 256, 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14)
    crops, K = 3000, epsilon 0.05, 3 Sinkhorn iterations, tau 0.1, LARS (momentum 0.9, trust 0.001,
    wd 1e-6), lr 0.6 cosine to 0.0006 without warm-up, prototypes frozen for 1 epoch, a 3840 queue from
    epoch 15: epochs of the store's train split, turned into steps when training starts
    (`config_lib.resolve_durations`); SwAV's LARC (not SimCLR's LARS, see medssl_jax/optim.py).

    Arguments: `runlocal` (a CPU-sized run on the embedded phantom dataset), `store` (an ingested store;
    '' = embedded phantoms), `micle` (hybrid: patient positives for the two global crops),
    `supervised` (hybrid: weight alpha of the BCE term on labelled records; needs `num_labels`),
    `num_labels` (the store's label count).
    """
    args = config_lib.parse_arg(arg, runlocal=False, store="", micle=False, supervised=0.0, num_labels=0)
    c = config_lib.pretrain_config()
    c.method = method
    extend_config(c)
    c.data.store = args.store
    c.data.sampler = "micle" if args.micle else "pairs"
    c.data.image_size = 224
    c.data.crop_scale = (0.14, 1.0)
    c.data.num_workers = 8
    c.model.depth, c.model.width = 50, 1
    c.head.hidden_dim = 2048
    c.head.out_dim = 128
    c.loss.temperature = 0.1
    # Chest X-ray photometric augmentation (brightness/contrast 0.5, rotation <= 45 deg) plus SwAV's blur
    # p 0.5; Ghesu et al.'s list is not public (robustness to intensity, rotation, scale is their aim).
    c.augment = augment.preset("azizi_cxr")
    c.augment.blur_p = 0.5
    c.batch_size = 256
    c.total_steps = 200_000
    c.optim.name = "larc"  # SwAV: apex LARC (trust 0.001, clip=False) around SGD momentum 0.9, every parameter
    c.optim.base_lr = 0.6
    c.optim.warmup_steps = 0
    c.optim.end_lr_factor = 0.001
    c.swav.freeze_prototypes_steps, c.swav.freeze_prototypes_epochs = -1, 1.0
    c.swav.queue_length = 3840
    c.swav.queue_start_steps, c.swav.queue_start_epochs = -1, 15.0
    c.log_every = 100
    c.checkpoint_every = 2000
    if method == "hybrid":
        c.hybrid.supervised_weight = args.supervised
        c.hybrid.num_labels = args.num_labels
    if args.runlocal:
        # Minutes on 2 CPU cores: a tiny ResNet on the embedded phantom dataset, 2 x 48 + 2 x 24 px crops.
        config_lib.apply_runlocal(c, image_size=48, probe_size=64)  # probe on whole phantoms, as MICLe's
        c.model.depth, c.model.width, c.model.base_width = 18, 1, 16
        c.data.crop_scale = (0.25, 1.0)
        c.swav.num_local_crops = 2
        c.swav.local_image_size = 24
        c.swav.local_crop_scale = (0.14, 0.4)
        # Keep K above the projection size: with K < out_dim the embeddings can turn orthogonal to every
        # prototype, all scores tie, the codes go uniform and the loss sticks at ln K. At batch 64 the
        # codes also need the queue (Sinkhorn over 1088 samples) and a sharper epsilon: with SwAV's 0.05
        # this run drifted to uniform codes (check_health stops it) on the similar-looking phantoms.
        c.head.out_dim = 32
        c.swav.num_prototypes = 64
        c.swav.epsilon = 0.02
        c.swav.freeze_prototypes_steps = 30
        c.swav.queue_length = 1024
        c.swav.queue_start_steps = 20
        c.augment.blur_p = 0.0
        c.total_steps = 600
        # The :runlocal learning rates below were chosen with SimCLR's LARS (BN and biases not adapted);
        # LARC was not re-tuned at this scale, so the CPU run keeps LARS.
        c.optim.name = "lars"
        # LARS lr chosen on the phantoms' validation split (600 steps, probe mean AUC; fair random init
        # 0.597): SwAV 0.6 -> 0.651, 1.2 -> 0.746, 2.4 -> 0.734.
        c.optim.base_lr = 1.2
        if method == "hybrid":
            # Chosen on the validation split too (600 steps; SimCLR's :runlocal: 0.796). NT-Xent on SwAV's
            # 32-d z ('shared'): lr 1.2 / tau 0.1 -> 0.720, 1.2 / 0.2 -> 0.708, 2.0 / 0.2 -> 0.736, 3.0 / 0.2
            # -> 0.720; lambda 0.5 -> 0.723, 2 -> 0.723, 4 -> 0.740, 100 -> 0.754; no local crops 0.726, no
            # queue 0.732: the shared 32-d embedding, not the clustering term, held NT-Xent back. On a SimCLR
            # head of its own ('separate', 128-d) at lr 3.0: lambda 1 -> 0.709 (lr 2.0), 4 -> 0.799, 10 ->
            # 0.784, 100 -> the SwAV branch collapses (it barely gets a gradient).
            c.optim.base_lr = 3.0
            c.hybrid.contrastive_head = "separate"
            c.hybrid.contrastive_weight = 4.0
            c.hybrid.contrastive_temperature = 0.2
        c.optim.end_lr_factor = 0.0
        c.head.hidden_dim = 128
    return c


def _is_hybrid(config) -> bool:
    return config.method == "hybrid"


def _supervised(config) -> bool:
    return _is_hybrid(config) and config.hybrid.supervised_weight > 0


def data_spec(config) -> dict:
    """What the pipeline must produce: 2 global crops (+ local crops) per element, and the per-sample
    fields the loss reads (labels for the supervised term, modality fields for intensity handling)."""
    crops = [{"name": "global", "num": 2, "size": config.data.image_size, "scale": tuple(config.data.crop_scale)}]
    if config.swav.num_local_crops > 0:
        crops.append({
            "name": "local",
            "num": config.swav.num_local_crops,
            "size": config.swav.local_image_size,
            "scale": tuple(config.swav.local_crop_scale),
        })
    fields = []
    if _supervised(config):
        fields.append("labels")
    if config.intensity.modality_aware:
        fields += ["modality_id", "bits_stored", "intensity_offset"]
    return {"sampler": config.data.sampler, "crops": crops, "fields": fields}


# --------------------------------------------------------------------------------------------- model


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


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, like torch.nn.functional.normalize.

    Written as x * rsqrt(max(||x||^2, eps^2)) so the gradient is finite at x = 0 (the norm's is NaN
    there), which a collapsed batch reaches: check_health must get to report it.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class SwAVModel(nn.Module):
    """Encoder + SwAV head + normalisation + prototypes (+ a linear classifier for the hybrid).

    Call with a sequence of crop groups, each [B, n_i, H_i, W_i, C] (one backbone call per group), or
    one [B, H, W, C] array. Returns (scores [B, V, K], out_dict) with 'features' [B, V, D] (encoder),
    'z' [B, V, out_dim] (normalised), 'scores' and, with a classifier, 'logits' [B, V, L].
    """

    encoder: nn.Module
    head: nn.Module
    num_prototypes: int
    num_labels: int = 0
    contrastive_head: nn.Module | None = None  # hybrid 'separate': a projection head for NT-Xent

    @nn.compact
    def __call__(self, crops, *, train: bool):
        features, encoder_out = multicrop_features(self.encoder, crops, train=train)
        z, head_out = self.head(features, train=train)
        z = l2_normalize(z)
        scores = nn.Dense(self.num_prototypes, use_bias=False, kernel_init=TORCH_LINEAR_INIT,
                          dtype=jnp.float32, param_dtype=jnp.float32, name="prototypes")(z)
        out = {"encoder": encoder_out, "features": features, "head": head_out, "z": z, "scores": scores}
        if self.contrastive_head is not None:
            glob = features[:, :2]  # the two global crops
            zc, _ = self.contrastive_head(glob.reshape(-1, glob.shape[-1]), train=train)
            out["contrastive_z"] = zc.reshape(glob.shape[0], 2, -1)
        if self.num_labels:
            out["logits"], _ = heads.LinearClassifier(self.num_labels, name="classifier")(features)
        return scores, out


def build(config) -> nn.Module:
    encoder = models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype})
    hidden = config.head.hidden_dim
    head = SwAVHead(hidden_dim=hidden if hidden >= 0 else None, out_dim=config.head.out_dim,
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
    return {**params, "prototypes": {**params["prototypes"], "kernel": l2_normalize(kernel.T).T}}


def init(model: nn.Module, rng: jax.Array, batch: dict, config) -> tuple[dict, Any]:
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


# --------------------------------------------------------------------------------------------- intensity


def modality_intensity(
    x: jax.Array,
    *,
    modality_id: jax.Array,
    bits_stored: jax.Array,
    intensity_offset: jax.Array,
    rng: jax.Array,
    ct_windows: Sequence[tuple[float, float]] = (CT_WINDOWS["lung"], CT_WINDOWS["soft_tissue"], CT_WINDOWS["bone"]),
    ct_window_probs: Sequence[float] | None = None,
    ct_window_jitter: float = 0.0,
    mr_percentiles: tuple[float, float] = (1.0, 99.0),
) -> jax.Array:
    """Maps crops to float32 [0, 1] by their modality; pure, batched, jittable.

    Args:
      x: crops [B, n, H, W, C] (or [B, H, W, C]), uint16 as the pipeline delivers them (stored value
        rescaled to the full uint16 range: value / (2**bits_stored - 1) * 65535) or floats in [0, 1].
      modality_id: int, per sample [B] or per crop [B, n]: MODALITY_CT, MODALITY_MR, or MODALITY_OTHER
        (X-ray, US, ...: as stored).
      bits_stored: int [B] or [B, n], the record's bits_stored (to undo the full-range rescaling).
      intensity_offset: float [B] or [B, n]: stored value = raw modality value (HU for CT) + offset.
      rng: key for the window choice (one preset per crop, independently).
      ct_windows: (centre, width) presets in HU, e.g. CT_WINDOWS values.
      ct_window_probs: preset probabilities (None: uniform).
      ct_window_jitter: each crop's centre moves by up to +-jitter * width and its width scales by up
        to 1 +- jitter, uniformly.
      mr_percentiles: MR crops are mapped linearly from these percentiles (of the crop) to [0, 1].

    Returns:
      float32 array shaped like x with values in [0, 1].
    """
    unit = augment.to_unit(x)
    crop_shape = x.shape[:-3]  # one window per crop
    for name, value in (("modality_id", modality_id), ("bits_stored", bits_stored),
                        ("intensity_offset", intensity_offset)):
        if jnp.shape(value) not in (crop_shape[:1], crop_shape):
            raise ValueError(f"modality_intensity: {name} must have shape {crop_shape[:1]} (per sample) or "
                             f"{crop_shape} (per crop), got {jnp.shape(value)}")

    def per_sample(v, dtype=jnp.float32):
        v = jnp.asarray(v, dtype)
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

    # CT: raw HU from the stored value, then a window sampled per crop.
    full_range = jnp.exp2(per_sample(bits_stored)) - 1.0
    hu = unit * full_range - per_sample(intensity_offset)
    windows = jnp.asarray(ct_windows, jnp.float32)  # [W, 2]
    k_choice, k_centre, k_width = jax.random.split(rng, 3)
    probs = None if not ct_window_probs else jnp.asarray(ct_window_probs, jnp.float32)
    choice = jax.random.choice(k_choice, windows.shape[0], shape=crop_shape, p=probs)
    centre, width = windows[choice, 0], windows[choice, 1]
    if ct_window_jitter:
        centre = centre + width * ct_window_jitter * jax.random.uniform(k_centre, crop_shape, minval=-1, maxval=1)
        width = width * (1.0 + ct_window_jitter * jax.random.uniform(k_width, crop_shape, minval=-1, maxval=1))
    centre, width = centre[..., None, None, None], width[..., None, None, None]
    ct = jnp.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)

    # MR: arbitrary units, so map the crop's own percentile range to [0, 1].
    flat = unit.reshape(*crop_shape, -1)
    low, high = jnp.percentile(flat, jnp.asarray(mr_percentiles, jnp.float32), axis=-1)
    low, high = low[..., None, None, None], high[..., None, None, None]
    mr = jnp.clip((unit - low) / jnp.maximum(high - low, 1e-6), 0.0, 1.0)

    modality = per_sample(modality_id, jnp.int32)
    return jnp.where(modality == MODALITY_CT, ct, jnp.where(modality == MODALITY_MR, mr, unit))


def _to_unit(crops: jax.Array, batch: dict, *, rng: jax.Array, config) -> jax.Array:
    if not config.intensity.modality_aware:
        return augment.to_unit(crops)
    missing = [k for k in ("modality_id", "bits_stored", "intensity_offset") if k not in batch]
    if missing:
        raise ValueError(f"config.intensity.modality_aware needs batch fields {missing} (see data_spec)")
    unknown = [w for w in config.intensity.ct_windows if w not in CT_WINDOWS]
    if unknown:
        raise ValueError(f"config.intensity.ct_windows has unknown presets {unknown}; known: {sorted(CT_WINDOWS)}")
    num = crops.shape[1]

    def per_crop(value):
        # [B] per element, or [B, 2] per source image (crop k comes from image k % 2, see the pipeline).
        return value[:, jnp.arange(num) % 2] if value.ndim == 2 else value

    return modality_intensity(
        crops,
        modality_id=per_crop(batch["modality_id"]),
        bits_stored=per_crop(batch["bits_stored"]),
        intensity_offset=per_crop(batch["intensity_offset"]),
        rng=rng,
        ct_windows=tuple(CT_WINDOWS[w] for w in config.intensity.ct_windows),
        ct_window_probs=tuple(config.intensity.ct_window_probs) or None,
        ct_window_jitter=config.intensity.ct_window_jitter,
        mr_percentiles=tuple(config.intensity.mr_percentiles),
    )


def augmented_crops(batch: dict, *, rng: jax.Array, config) -> tuple[jax.Array, ...]:
    """Every crop group of the batch -> float32 [B, n, H, W, C] after intensity handling and the
    device-side photometric augmentation (independent randomness per group and per crop)."""
    groups = []
    for index, crop in enumerate(data_spec(config)["crops"]):
        views = batch[crop["name"]]
        if views.shape[1] != crop["num"] or views.shape[2] != crop["size"]:
            raise ValueError(f"batch[{crop['name']!r}] has shape {views.shape}, expected "
                             f"[B, {crop['num']}, {crop['size']}, {crop['size']}, C] (config / pipeline mismatch)")
        k_intensity, k_augment = jax.random.split(jax.random.fold_in(rng, index))
        unit = _to_unit(views, batch, rng=k_intensity, config=config)
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
    metrics.update(_clustering_stats(scores, codes, z, crops_for_assign))
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


def _clustering_stats(scores, codes, z, crops_for_assign) -> dict:
    """Collapse statistics over the assignment crops (see check_health)."""
    k = scores.shape[-1]

    def top_fraction(assigned):
        counts = jnp.sum(jax.nn.one_hot(assigned, k, dtype=jnp.float32), axis=0)
        return jnp.max(counts) / assigned.shape[0], jnp.sum(counts > 0).astype(jnp.float32)

    q = jnp.concatenate(codes)
    code_top, prototypes_used = top_fraction(jnp.argmax(q, axis=-1))
    nearest_top, _ = top_fraction(jnp.concatenate([jnp.argmax(scores[:, a], axis=-1) for a in crops_for_assign]))
    code_entropy = -jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1)
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


def check_health(metrics, *, step) -> str | None:
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
    if samples >= COLLAPSE_MIN_SAMPLES and top > COLLAPSE_TOP_PROTOTYPE_FRACTION:
        return f"SwAV collapse at step {step}: nearly all samples are assigned to one prototype ({stats})"
    if spread < COLLAPSE_EMBEDDING_STD:
        return f"SwAV collapse at step {step}: every sample has the same embedding ({stats})"
    if float(metrics["swav/code_entropy"]) > COLLAPSE_CODE_ENTROPY:
        return (f"SwAV collapse at step {step}: the codes are uniform over the prototypes (the scores "
                f"hardly differ), so the loss sits at ln K = {math.log(float(metrics['swav/num_prototypes'])):.3f} "
                f"with no gradient; small batches need the queue (swav.queue_length), and K should exceed "
                f"head.out_dim ({stats})")
    return None
