"""DINO self-distillation (Caron et al. 2021, facebookresearch/dino `main_dino.py`) for ViTs and ResNets.

- Student: encoder (`config.model`: a ViT, `pre_logits` = the normed CLS token, or a ResNet) + `DINOHead`:
  MLP in -> hidden -> hidden -> bottleneck (exact GELU; BatchNorm after each hidden Linear with
  `use_bn_in_head`), L2 normalisation, then a bias-free weight-normalised last layer to K prototypes,
  w_k = g_k v_k / ||v_k|| with g fixed to 1 (`norm_last_layer`; False makes g trainable).
- Teacher: an EMA copy of the whole student (backbone + head) in `method_state["teacher"]`, so it is
  checkpointed with the run. It is the student at step 0 (DINO loads the student's weights into the
  teacher before training), which also covers `config.init`: the student is initialised from the
  export and the teacher copies it at the first step. After every update (`after_update`)
  teacher = m * teacher + (1 - m) * student, m a cosine from `momentum_teacher` (0.996) to 1 over
  `config.total_steps`. The teacher runs without stochastic depth and without gradient.
- Multi-crop: 2 global crops + `num_local_crops` local crops; each resolution goes through the backbone
  in its own call (two fixed shapes; the ViT resamples its position embeddings in-graph), the head sees
  all crops. The teacher sees only the global crops. Crops stay [B, n, ...] with the batch axis first,
  so the data-parallel sharding never moves data to form crops.
- Loss (`dino_loss`, losses/dino.py): t = softmax((teacher - centre) / T_t(step)), s = log_softmax(student / T_s);
  the mean over the pairs (teacher crop i, student crop v != i) of the batch mean of -sum_k t s.
  T_t warms up from `warmup_teacher_temp` to `teacher_temp` as DINO's per-epoch `np.linspace`: one value
  per `teacher_temp_epoch_steps` steps, `teacher_temp` already at the warm-up's last epoch.
- Centre: centre = 0.9 centre + 0.1 mean over the global batch and both global crops of the raw teacher
  outputs (a plain jnp.mean under jit: XLA inserts the cross-device reduction, as DINO's all_reduce).
  `centering="sinkhorn_knopp"` replaces softmax-after-centring with DINOv2's Sinkhorn-Knopp teacher
  (`teacher_targets`); `koleo_weight` > 0 adds DINOv2's KoLeo term on the student's global-crop backbone
  features (`losses.koleo`). Both are off by default (DINO's recipe).
- iBOT (`ibot_weight` > 0, DINOv2's masked image modelling; ViT, Sinkhorn-Knopp teacher): each global crop
  is masked with probability `ibot_mask_probability`, a share U(`ibot_mask_ratio`) of its patches replaced by
  a learned mask token (`DINOModel.mask_token`, outside the encoder, so exports stay plain ViTs) in the
  student only; the DINO head (shared, DINOv2's default) maps the student's and the teacher's patch tokens
  at the masked positions to K prototypes, the teacher's through Sinkhorn-Knopp over all masked patches of
  the batch (`ibot_masks` keeps them in fixed-size slots, `losses.sinkhorn(valid=...)`), and `ibot_loss`
  is DINOv2's `forward_masked`. Random patch masks, not DINOv2's block-wise ones.
- `process_grads`: each parameter tensor's gradient clipped to norm `clip_grad` (3.0) separately, then
  the last layer's gradient zeroed for the first `freeze_last_layer_steps` steps. Unlike PyTorch (which
  skips parameters without a gradient), optax still applies weight decay to the frozen last layer; with
  g fixed to 1 that rescales v without changing the output.
- Export: the TEACHER backbone (`export_variables`); DINO evaluates the teacher.
- `check_health`: collapse shows as a teacher that puts every sample on one prototype (per-sample and
  batch-marginal entropies -> 0) or a uniform teacher (per-sample entropy -> log K) that the student
  matches (KL(teacher || student) -> 0, the paper's Fig. 7). A near-uniform teacher alone is not
  collapse: early in training DINO's teacher is close to uniform (loss ~ ln K) while the student is not
  yet matching it.

Durations here are steps (`config.total_steps` must be set): the EMA and temperature schedules are
functions of the step inside the jitted update, which does not know the epoch size.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from medssl_jax import augment, losses, models
from medssl_jax.losses.dino import CENTERINGS, dino_loss, ibot_loss, teacher_targets, updated_center
from medssl_jax.methods import Method, check_crops, health, multicrop_spec
from medssl_jax.models import heads
from medssl_jax.models.ssl import DINOModel

# --------------------------------------------------------------------------------------------- config



def extend_config(config: mlc.ConfigDict) -> None:
    """Adds `config.dino` with DINO's defaults (`main_dino.py` arguments; durations in steps) and makes
    `config.model` a ViT's field set (the recipe's encoder; a ResNet config replaces it)."""
    config.model = models.model_config("vit")
    d = mlc.ConfigDict()
    d.num_prototypes = 65536  # K (DINO's out_dim)
    d.hidden_dim = 2048
    d.bottleneck_dim = 256
    d.num_head_layers = 3  # Linear layers before the last (weight-normalised) one
    d.norm_last_layer = True  # g fixed to 1
    d.use_bn_in_head = False  # DINO's --use_bn_in_head: BatchNorm after each hidden Linear of the head
    d.student_temp = 0.1
    d.teacher_temp = 0.04  # after the warm-up (DINO uses up to 0.07)
    d.warmup_teacher_temp = 0.04
    d.teacher_temp_warmup_steps = 0  # DINO: 30 epochs
    d.teacher_temp_epoch_steps = 1  # steps per value of the warm-up (DINO: one epoch; 1 = per step)
    d.center_momentum = 0.9
    # "centering" (DINO: the momentum centre above) or "sinkhorn_knopp" (DINOv2's teacher: an equipartition
    # of the batch over the prototypes, as SwAV's codes, with T_t as the entropic regulariser).
    d.centering = "centering"
    d.sinkhorn_iters = 3
    d.koleo_weight = 0.0  # DINOv2's KoLeo regulariser on the student's global-crop features (DINOv2: 0.1)
    # iBOT's masked-patch term (DINOv2: weight 1; ViT encoders, Sinkhorn-Knopp teacher, the DINO head shared):
    # with `ibot_mask_probability` a global crop gets a random share U(ibot_mask_ratio) of its patches
    # replaced by a learned mask token in the student, which must predict the teacher's codes there.
    d.ibot_weight = 0.0
    d.ibot_mask_probability = 0.5
    d.ibot_mask_ratio = (0.1, 0.5)
    d.momentum_teacher = 0.996  # cosine to 1 over config.total_steps
    d.freeze_last_layer_steps = 0  # DINO: 1 epoch
    d.clip_grad = 3.0  # per-tensor gradient norm; 0 = no clipping
    d.num_local_crops = 8  # multi-crop: 2 x data.image_size (data.crop_scale) + locals
    d.local_image_size = 96
    d.local_crop_scale = (0.05, 0.4)
    # DINO's per-crop photometric probabilities on top of config.augment (which sets the colour jitter).
    d.global1_blur_p = 1.0
    d.global2_blur_p = 0.1
    d.global2_solarize_p = 0.2
    d.local_blur_p = 0.5
    # No collapse check before this step: a random network barely depends on its input, so DINO's teacher
    # starts near uniform (loss ~ ln K) and may favour one prototype until the centre has caught up.
    d.health_check_after_steps = 1000
    config.dino = d


def _check_config(config) -> None:
    if config.dino.centering not in CENTERINGS:
        raise ValueError(f"config.dino.centering={config.dino.centering!r} is not one of {list(CENTERINGS)}")
    if config.dino.koleo_weight < 0:
        raise ValueError(f"config.dino.koleo_weight={config.dino.koleo_weight}: must be >= 0")
    if config.dino.use_bn_in_head and config.model.get("drop_path_rate", 0.0):
        raise ValueError("config.dino.use_bn_in_head with config.model.drop_path_rate > 0: the teacher runs in "
                         "training mode with BatchNorm, which would also apply drop path to it")
    if config.dino.ibot_weight < 0:
        raise ValueError(f"config.dino.ibot_weight={config.dino.ibot_weight}: must be >= 0")
    if config.dino.ibot_weight > 0:
        d = config.dino
        low, high = (float(v) for v in d.ibot_mask_ratio)
        for broken, problem in (
            (config.model.name != "vit", "needs a ViT encoder (patch tokens)"),
            (d.centering != "sinkhorn_knopp",
             "needs config.dino.centering='sinkhorn_knopp' (DINOv2's teacher for the masked patches)"),
            (d.use_bn_in_head, "does not take config.dino.use_bn_in_head (the head also runs on patch tokens)"),
            (not 0 < low <= high < 1, f"ibot_mask_ratio={d.ibot_mask_ratio} must be 0 < low <= high < 1"),
            (not 0 < d.ibot_mask_probability <= 1, f"ibot_mask_probability={d.ibot_mask_probability} must be in (0, 1]"),
        ):
            if broken:
                raise ValueError(f"config.dino.ibot_weight={d.ibot_weight}: iBOT {problem}")
    if config.total_steps is None or config.total_steps < 1:
        raise ValueError(f"config.total_steps={config.total_steps}: DINO needs the run length in steps "
                         "(its EMA momentum schedule runs over config.total_steps)")


def build(config) -> nn.Module:
    d = config.dino
    encoder = models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype})
    head = heads.DINOHead(num_prototypes=d.num_prototypes, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                    num_layers=d.num_head_layers, norm_last_layer=d.norm_last_layer, use_bn=d.use_bn_in_head,
                    dtype=jnp.dtype(config.compute_dtype))
    return DINOModel(encoder=encoder, head=head, ibot=d.ibot_weight > 0)


def data_spec(config) -> dict:
    crops = multicrop_spec(config, num_local=config.dino.num_local_crops, local_size=config.dino.local_image_size,
                           local_scale=config.dino.local_crop_scale)
    return {"sampler": config.data.sampler, "crops": crops}


def init(model: nn.Module, rng: jax.Array, batch: dict, config, inputs=None) -> tuple[dict, Any]:
    """Student variables and {'teacher': a copy of the student's params, 'center': zeros [K]} (+ the
    teacher's own BatchNorm statistics, 'teacher_batch_stats', for an encoder with BatchNorm)."""
    del inputs  # no Method.init_inputs: a pretraining run's init reads only its config
    _check_config(config)
    crops = tuple(jnp.zeros((2, 1, *batch[c["name"]].shape[2:]), jnp.float32) for c in data_spec(config)["crops"])
    params_rng, dropout_rng = jax.random.split(rng)
    variables = dict(model.init({"params": params_rng, "dropout": dropout_rng}, crops, train=True))
    params = variables["params"]
    method_state = {
        # A copy, not an alias: the train step donates its state, and the two trees must not share buffers.
        "teacher": jax.tree.map(jnp.copy, params),
        "center": jnp.zeros((config.dino.num_prototypes,), jnp.float32),
    }
    out = {"params": params}
    if jax.tree.leaves(variables.get("batch_stats", {})):
        out["batch_stats"] = variables["batch_stats"]
        method_state["teacher_batch_stats"] = jax.tree.map(jnp.copy, variables["batch_stats"])
    return out, method_state


# --------------------------------------------------------------------------------------------- schedules


def teacher_temperature(step, config) -> jax.Array:
    """DINO's `np.linspace(warmup_teacher_temp, teacher_temp, n)` over the n warm-up epochs, then flat.

    An "epoch" is `teacher_temp_epoch_steps` steps and n = teacher_temp_warmup_steps / that (rounded up):
    epoch e < n gets the e-th of the n evenly spaced values, so the last warm-up epoch already has
    `teacher_temp` (one epoch before a plain linear ramp would reach it), as in main_dino.py.
    """
    d = config.dino
    unit = int(d.teacher_temp_epoch_steps)
    if unit < 1:
        raise ValueError(f"config.dino.teacher_temp_epoch_steps={unit}: must be >= 1")
    warmup_epochs = -(-int(d.teacher_temp_warmup_steps) // unit)
    if warmup_epochs <= 0:
        return jnp.float32(d.teacher_temp)
    epoch = jnp.asarray(step, jnp.int32) // unit
    progress = jnp.minimum(epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1), 1.0)
    value = d.warmup_teacher_temp + (d.teacher_temp - d.warmup_teacher_temp) * progress
    # np.linspace(a, b, 1) is [a]: a one-epoch warm-up holds the start value for that epoch.
    return jnp.where(epoch < warmup_epochs, value if warmup_epochs > 1 else jnp.float32(d.warmup_teacher_temp),
                     jnp.float32(d.teacher_temp))


def teacher_momentum(step, config) -> jax.Array:
    """EMA momentum after update `step` (0-based): cosine from momentum_teacher to 1 over total_steps."""
    m0 = config.dino.momentum_teacher
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / config.total_steps, 1.0)
    return 1.0 - (1.0 - m0) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


# --------------------------------------------------------------------------------------------- loss


def ibot_masks(rng: jax.Array, *, num_crops: int, num_patches: int, probability: float, ratio) -> tuple:
    """iBOT's masks for `num_crops` global crops of `num_patches` patches: with `probability` a crop gets
    floor(U(ratio) * N) random patches masked (DINOv2 masks a fixed share of the crops with stratified
    ratios and block-wise masks; here each crop draws its own, patch by patch).

    Returns (mask [C, N] bool, index [C, M] int32, valid [C, M] bool): the masked patches are index[c, :k_c]
    in a fixed-size array of M = ceil(max ratio * N) slots, valid marking the first k_c of them.
    """
    k_select, k_ratio, k_order = jax.random.split(rng, 3)
    low, high = (float(v) for v in ratio)
    slots = max(1, math.ceil(high * num_patches))
    chosen = jax.random.bernoulli(k_select, probability, (num_crops,))
    share = jax.random.uniform(k_ratio, (num_crops,), minval=low, maxval=high)
    count = jnp.where(chosen, jnp.minimum(jnp.floor(share * num_patches), slots), 0).astype(jnp.int32)
    order = jnp.argsort(jax.random.uniform(k_order, (num_crops, num_patches)), axis=1).astype(jnp.int32)
    rank = jnp.argsort(order, axis=1)
    return rank < count[:, None], order[:, :slots], jnp.arange(slots)[None, :] < count[:, None]


def _crop_augment(config, *, blur_p: float, solarize_p: float | None = None) -> mlc.ConfigDict:
    cfg = mlc.ConfigDict(config.augment.to_dict())
    cfg.blur_p = float(blur_p)
    if solarize_p is not None:
        cfg.solarize_p = float(solarize_p)
    return cfg


def augmented_crops(batch: dict, *, rng: jax.Array, config) -> tuple[jax.Array, ...]:
    """(globals [B, 2, H, W, C], locals [B, n, h, w, C] if any) as float32 in [0, 1], with DINO's
    per-crop blur/solarisation probabilities on top of config.augment."""
    d = config.dino
    check_crops(batch, data_spec(config)["crops"])
    k1, k2, k3 = jax.random.split(rng, 3)
    views = batch["global"]
    # Solarisation only on the second global crop, as DINO; the first never solarises.
    g1 = augment.augment_views(views[:, :1], rng=k1, cfg=_crop_augment(config, blur_p=d.global1_blur_p, solarize_p=0.0))
    g2 = augment.augment_views(views[:, 1:], rng=k2,
                               cfg=_crop_augment(config, blur_p=d.global2_blur_p, solarize_p=d.global2_solarize_p))
    groups = [jnp.concatenate([g1, g2], axis=1)]
    if d.num_local_crops > 0:
        groups.append(augment.augment_views(batch["local"], rng=k3,
                                            cfg=_crop_augment(config, blur_p=d.local_blur_p, solarize_p=0.0)))
    return tuple(groups)


def _sync_teacher(params, teacher, step):
    """The teacher used at `step`: the student itself at step 0 (DINO copies the student into the teacher
    before training, which also picks up a student initialised from config.init), else the EMA."""
    return jax.tree.map(lambda s, t: jnp.where(step == 0, s, t), params, teacher)


def loss_fn(params, batch_stats, method_state, batch, *, model, rng, step, config):
    d = config.dino
    augment_rng, dropout_rng = jax.random.split(rng)
    crops = augmented_crops(batch, rng=augment_rng, config=config)
    teacher = jax.lax.stop_gradient(_sync_teacher(params, method_state["teacher"], step))
    temp = teacher_temperature(step, config)
    new_state = {}
    if "teacher_batch_stats" in method_state:
        # BatchNorm in the encoder (ResNet) or the head: as in DINO's own code the teacher runs in training
        # mode, so its BatchNorm normalises with the batch's statistics; its running statistics are its own
        # (the encoder's are exported).
        teacher_stats = _sync_teacher(batch_stats, method_state["teacher_batch_stats"], step)
        (teacher_logits, _), teacher_updates = model.apply({"params": teacher, "batch_stats": teacher_stats},
                                                           crops[:1], train=True, mutable=["batch_stats"])
        new_state["teacher_batch_stats"] = jax.lax.stop_gradient(teacher_updates["batch_stats"])
        (student_logits, student_out), student_updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, crops, train=True, mutable=["batch_stats"],
            rngs={"dropout": dropout_rng})
        batch_stats = student_updates["batch_stats"]
    elif d.ibot_weight > 0:  # ViT + iBOT: the student sees masked global crops, both heads see those patches
        globals_ = crops[0]
        patch = model.encoder.arch()["patch_size"]
        masks, index, valid = ibot_masks(jax.random.fold_in(augment_rng, 1), num_crops=globals_.shape[0] * 2,
                                         num_patches=(globals_.shape[2] // patch) * (globals_.shape[3] // patch),
                                         probability=d.ibot_mask_probability, ratio=d.ibot_mask_ratio)
        teacher_logits, teacher_out = model.apply({"params": teacher}, crops[:1], train=False, patch_index=index)
        student_logits, student_out = model.apply({"params": params}, crops, train=True, masks=masks,
                                                  patch_index=index, rngs={"dropout": dropout_rng})
        patch_targets = losses.sinkhorn(
            scores=jax.lax.stop_gradient(teacher_out["patch_logits"]).reshape(-1, d.num_prototypes),
            epsilon=temp, num_iters=d.sinkhorn_iters, valid=valid.reshape(-1))
        ibot = ibot_loss(student_logits=student_out["patch_logits"], teacher_probs=patch_targets.reshape(
            *index.shape, d.num_prototypes), valid=valid, student_temp=d.student_temp)
    else:  # ViT: no BatchNorm; the teacher sees the globals only, without drop path
        teacher_logits, _ = model.apply({"params": teacher}, crops[:1], train=False)
        student_logits, student_out = model.apply({"params": params}, crops, train=True, rngs={"dropout": dropout_rng})
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    targets = teacher_targets(teacher_logits=teacher_logits, center=method_state["center"], teacher_temp=temp,
                              centering=d.centering, sinkhorn_iters=d.sinkhorn_iters)
    loss, stats = dino_loss(student_logits=student_logits, teacher_probs=targets, student_temp=d.student_temp)
    extra = {}
    if d.ibot_weight > 0:
        extra["dino/ibot"] = ibot
        extra["dino/ibot_masked_share"] = jnp.mean(masks.astype(jnp.float32))
        loss = loss + d.ibot_weight * ibot
    if d.koleo_weight > 0:
        # DINOv2: KoLeo on the student's backbone features, one term per global crop.
        extra["dino/koleo"] = sum(losses.koleo(features=student_out["features"][:, i]) for i in range(2))
        loss = loss + d.koleo_weight * extra["dino/koleo"]
    new_state.update(teacher=teacher, center=updated_center(method_state["center"], teacher_logits, d.center_momentum))
    metrics = {"loss": loss, "dino/teacher_temp": temp, "dino/momentum": teacher_momentum(step, config),
               "dino/health_check": (step + 1 >= d.health_check_after_steps).astype(jnp.float32)}
    metrics.update(health.dino_stats(stats), **extra)
    return loss, (batch_stats, new_state, metrics)


# --------------------------------------------------------------------------------------------- train-loop hooks


def clip_per_tensor(grads, max_norm: float):
    """DINO's `clip_gradients`: every tensor g -> g * min(1, max_norm / (||g|| + 1e-6)) on its own."""
    def clip(g):
        norm = jnp.linalg.norm(g.astype(jnp.float32).reshape(-1))
        return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)
    return jax.tree.map(clip, grads)


def process_grads(grads, *, step, config):
    """Per-tensor clipping at clip_grad, then no last-layer update for the first freeze_last_layer_steps."""
    d = config.dino
    if d.clip_grad > 0:
        grads = clip_per_tensor(grads, d.clip_grad)
    frozen = step < d.freeze_last_layer_steps
    last = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g), grads["head"]["last_layer"])
    return {**grads, "head": {**grads["head"], "last_layer": last}}


def ema(teacher, student, momentum):
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


def after_update(params, method_state, *, step, config):
    """teacher = m(step) * teacher + (1 - m(step)) * updated student."""
    teacher = ema(method_state["teacher"], params, teacher_momentum(step, config))
    return params, {**method_state, "teacher": teacher}


def export_variables(variables: dict, method_state: dict) -> dict:
    """What DINO exports: the teacher's backbone (DINO evaluates the teacher), with its own BatchNorm
    statistics for an encoder that has them."""
    del variables
    out = {"params": method_state["teacher"]["encoder"]}
    if "encoder" in method_state.get("teacher_batch_stats", {}):
        out["batch_stats"] = method_state["teacher_batch_stats"]["encoder"]
    return out


check_health = health.dino_check

METHOD = Method(data_spec=data_spec, build=build, init=init, loss_fn=loss_fn, extend_config=extend_config,
                process_grads=process_grads, after_update=after_update, check_health=check_health,
                export_variables=export_variables)
