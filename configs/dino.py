r"""DINO self-distillation pretraining of a ViT (Caron et al. 2021) on chest radiographs.

Student ViT + DINO head (MLP 2048-2048-256, L2 norm, weight-normalised last layer to K = 65536
prototypes, g fixed to 1) against an EMA teacher (momentum 0.996 -> 1, cosine) that sees only the two
global crops; centring (momentum 0.9) and sharpening (teacher temperature 0.04 -> 0.07 over 30 epochs,
student 0.1); multi-crop 2 x 224 px (scale 0.4-1) + 8 x 96 px (scale 0.05-0.4); AdamW lr 5e-4 x B/256,
10 warm-up epochs then cosine to 1e-6, weight decay 0.04 -> 0.4 (cosine), per-tensor gradient clipping
at 3.0, last layer frozen for the first epoch, drop path 0.1. Device augmentation: DINO's colour jitter
(brightness/contrast 0.4 act on 1-channel radiographs; saturation, hue and grayscale need RGB), blur p
1.0 / 0.1 / 0.5 (global 1 / global 2 / locals), solarisation p 0.2 on global 2; flips on the host. The
exported encoder is the teacher's backbone (`dino.export_variables`, which the train loop calls); a linear
probe on its CLS features follows.

Offline run on the embedded phantom dataset: the ResNet-18 (base width 16) of the other :runlocal
configs with DINO's student/EMA-teacher self-distillation and DINOv2's Sinkhorn-Knopp teacher, 2 x 48 px +
2 x 24 px crops, K = 64 prototypes, teacher temperature 0.02, BatchNorm in a 2-layer head, EMA momentum
0.9 (the run is short), LARS, 600 steps of 64 images. It writes WORKDIR/eval/summary.json and prints the
linear-probe mean AUC next to the fair random-init encoder's (`vs_random_init`):

  python -m medssl_jax.main --config=configs/dino.py:runlocal --workdir=/tmp/dino_local

Measured from a clean clone on 2 CPU cores (2026-12-01), the test split read once: 4 min 52 s; test
(1749 images of 800 held-out patients) linear-probe mean AUC 0.658 vs 0.587 for the random-init ResNet-18,
difference +0.071 [95% CI +0.049, +0.094], p < 0.001 (BENCHMARKS.md, "Evidence").

`encoder=vit` is a tiny ViT (width 64, 4 blocks, patch 8, 2 x 32 + 4 x 16 px crops, K = 256, DINO's
centring, AdamW) that runs every ViT part but does not learn at this size (test: +0.004 [-0.009, +0.019]).
How the :runlocal values were chosen on the validation split: BENCHMARKS.md, "DINO :runlocal".

Full run (ViT-S/16; `variant=B/16` for ViT-B) on an ingested chest X-ray store, e.g. CheXpert via
`python -m medssl_jax.ingest`; `steps_per_epoch` = training images / 256 (875 for CheXpert's ~224k)
sets the epoch-based durations (100 epochs, 10 lr warm-up, 30 teacher-temperature warm-up, 1 frozen):

  python -m medssl_jax.main --config=configs/dino.py:store=/data/cxr_store,steps_per_epoch=875 \
      --config.model.attention=cudnn --workdir=/runs/dino_vits16

DINO's ResNet-50 recipe (`encoder=resnet`: the README's convnet command, SGD lr 0.03 x B/256, weight decay
1e-4, crops 0.14-1 / 0.05-0.14, teacher temperature 0.04; not run here at this size):

  python -m medssl_jax.main --config=configs/dino.py:store=/data/cxr_store,encoder=resnet,steps_per_epoch=875 \
      --workdir=/runs/dino_rn50

ViT-L/14 and ViT-g/14 (`variant=L/14`, `variant=g/14`) shard parameters, AdamW moments and the teacher
over 8 devices (FSDP: config.mesh (("data", -1), ("fsdp", 8)), config.sharding_rules ((".*", "fsdp"),),
`fsdp=N` for another group size) with rematerialised blocks; the device count must be a multiple of 8:

  python -m medssl_jax.main --config=configs/dino.py:store=/data/cxr_store,variant=L/14,steps_per_epoch=875 \
      --config.model.attention=cudnn --workdir=/runs/dino_vitl14

Continued pretraining from a foundation checkpoint (RAD-DINO's recipe: DINOv2, DINOv3, RAD-DINO or any
export, converted with `python -m medssl_jax.convert`, trained further on your images): `init=DIR` in the
config argument takes the whole model from the checkpoint's config.json (architecture, input
normalisation), starts student and teacher from its weights with a fresh DINO head, and sets the recipe
(`_continued_pretraining` below says why each value): 30 epochs; the heads learn on a frozen backbone for
the first epoch; a tenth of DINO's lr with DINOv2's layer-wise lr decay 0.9 and patch-embedding lr x0.2;
Sinkhorn-Knopp teacher, KoLeo 0.1, iBOT's masked-patch term (weight 1, `config.dino.ibot_*`), teacher
momentum 0.992 -> 1, teacher temperature 0.04 -> 0.07 over the first third; DINOv2's crop scales.
ViT-L and ViT-g checkpoints run on FSDP over 8 devices:

  python -m medssl_jax.convert --format=hf-dinov2 --input=/downloads/rad-dino --output=/ckpt/rad_dino
  python -m medssl_jax.main --config=configs/dino.py:store=/data/cxr_store,init=/ckpt/rad_dino,steps_per_epoch=875 \
      --config.model.attention=cudnn --workdir=/runs/rad_dino_continued

(`--config.init=DIR` alone only loads the weights into the from-scratch recipe, whose model fields must
then describe the checkpoint.) Measured on the embedded phantoms with a small ViT (`:runlocal,init=DIR`:
600 steps, 32 / 16 px crops, the first 50 steps heads only, iBOT off as chosen on validation):
BENCHMARKS.md, "Continued pretraining".
The DINO head (shared by the iBOT term, DINOv2's default) and the mask token start fresh because DINOv2
and DINOv3 release only the teacher's backbone. iBOT's masks here are random patches, not DINOv2's
block-wise ones.

Hardware and runtime (an ESTIMATE, not a measurement of this config): per image a step is 2 global
crops through student and teacher plus 8 local crops of (96/224)^2 = 0.18 the tokens each, about 3.5
global-crop forward/backward passes for the student and 2 forwards for the teacher. No ViT step has been
timed on a GPU yet (BENCHMARKS.md, "Status of the GPU targets", has the ViT-B/16 target and the suite row
that measures it), so the runtime of this recipe on an H100 is not known. Memory: batch 256 fits one 80 GB card for ViT-S/16; use `--config.model.remat=True` for B/16.
Expected result: no published number for this recipe on chest X-rays. For scale, DINO's ViT-S/16
reaches 74.5 % k-NN / 77.0 % linear ImageNet top-1 after 800 epochs at batch 1024 (DINO README); 100
epochs give less. Expect a linear-probe mean AUC above a random-init encoder and below a fine-tuned
DINOv2 (configs/dinov2_finetune.py); compare runs with `python -m medssl_jax.compare`. The teacher's
entropy and KL to the student are logged (dino/* in metrics.jsonl); after the lr warm-up the run stops
with a message if the teacher collapses.
"""

from medssl_jax import augment, config_lib, models
from medssl_jax.methods import dino


def get_config(arg=None):
    """DINO's ViT-S/16 recipe (main_dino.py's arguments), with its epoch-based values as steps at
    `steps_per_epoch` since the method's schedules run in steps.

    Arguments: `runlocal` (a CPU-sized run on the embedded phantom dataset), `store` (an ingested store;
    '' = embedded phantoms), `variant` (ViT 'S/16', 'B/16', 'L/14' or 'g/14'; also 'vit_l14', 'vit_g14'),
    `fsdp` (devices that shard the state: default 8 for L and g, 1 = data parallel for S and B), `steps_per_epoch` (images in the train
    split / batch; default 875 = CheXpert's ~224k training images at batch 256), `epochs` (100; 30 with
    `init`), `init` (continued pretraining from that export or converted checkpoint, its model included),
    `encoder` ('vit', or 'resnet': DINO's ResNet-50 recipe, and at :runlocal, the default there, the
    ResNet-18 of the other :runlocal configs; or DINOv3's convnext_tiny / _small / _base / _large with the
    ViT recipe's optimiser).
    """
    args = config_lib.parse_arg(arg, runlocal=False, store="", variant="S/16", steps_per_epoch=875, epochs=0,
                                encoder="", fsdp=0, init="")
    args.variant = {"vit_l14": "L/14", "vit_g14": "g/14"}.get(args.variant, args.variant)
    source = _source_model(args.init) if args.init else None
    # The full recipe is DINO's ViT; the CPU run's default is the ResNet-18 (the ViT does not learn there).
    args.encoder = args.encoder or (source["name"] if source else "resnet" if args.runlocal else "vit")
    choices = ["resnet", "vit", *config_lib.CONVNEXT_ENCODERS]
    if args.encoder not in choices and not (source and args.encoder == "convnext"):
        raise ValueError(f"config argument encoder={args.encoder!r} is not one of {choices}")
    if source and args.encoder != source["name"]:
        raise ValueError(f"config argument encoder={args.encoder!r}: the init {args.init} is a {source['name']}")
    args.epochs = args.epochs or (CONTINUED_EPOCHS if source else 100)
    if args.epochs < 0 or args.steps_per_epoch < 1:
        raise ValueError(f"config arguments epochs={args.epochs}, steps_per_epoch={args.steps_per_epoch}: must be >= 1")
    c = config_lib.pretrain_config()
    c.method = "dino"
    dino.extend_config(c)
    c.data.store = args.store
    c.data.sampler = "pairs"
    c.data.image_size = 224
    c.data.crop_scale = (0.4, 1.0)
    c.data.num_workers = 8
    c.model = models.model_config("vit", variant=args.variant, image_size=224, in_chans=1, pool="token",
                                  drop_path_rate=0.1)
    # DINO's colour augmentation: jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2 (on 1-channel
    # radiographs only brightness and contrast act); blur and solarisation are per crop (config.dino).
    c.augment = augment.preset("none")
    c.augment.update(color_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2)
    # ViT-L/14 and ViT-g/14 (300M / 1.1B parameters; with AdamW's two moments and the teacher, 4 copies)
    # do not fit replicated at a useful batch: FSDP over `fsdp` devices (default 8) shards every parameter,
    # optimiser moment and the teacher; the batch is still split over all devices.
    large = source["width"] >= 1024 if source and source["name"] == "vit" else args.variant.split("/")[0] in ("L", "g")
    fsdp = args.fsdp or (8 if large else 1)
    if fsdp < 1:
        raise ValueError(f"config argument fsdp={args.fsdp}: must be >= 1 (1 = data parallel only)")
    if fsdp > 1:
        c.mesh = (("data", -1), ("fsdp", fsdp))
        c.sharding_rules = ((".*", "fsdp"),)
        c.model.remat = True
    epoch = args.steps_per_epoch
    c.batch_size = 256
    c.total_steps = args.epochs * epoch
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp_warmup_steps = 30 * epoch
    c.dino.teacher_temp_epoch_steps = epoch
    c.dino.freeze_last_layer_steps = epoch
    c.dino.health_check_after_steps = 10 * epoch  # after the lr warm-up
    # AdamW (PyTorch defaults b = (0.9, 0.999), eps 1e-8), lr 5e-4 per 256 images (linear scaling).
    c.optim.update(name="adamw", base_lr=5e-4, lr_scaling="linear", schedule="cosine", warmup_steps=10 * epoch,
                   end_lr_factor=1e-6 / (5e-4 * c.batch_size / 256),  # DINO's min_lr 1e-6
                   weight_decay=0.04, weight_decay_end=0.4, b1=0.9, b2=0.999, eps=1e-8)
    if args.encoder == "resnet":
        _resnet_recipe(c)
    c.log_every = 100
    c.checkpoint_every = 2000
    if args.runlocal:
        _runlocal(c, vit=args.encoder != "resnet")
    if args.encoder in config_lib.CONVNEXT_ENCODERS:
        config_lib.use_convnext(c, args.encoder)  # with the ViT recipe's AdamW values
    if source:
        _continued_pretraining(c, args, source)
    return c


def _resnet_recipe(c) -> None:
    # DINO's ResNet-50 command (facebookresearch/dino README, "ResNet-50 and other convnets trainings"):
    # SGD (momentum 0.9) lr 0.03 x B/256 with the same 10-epoch warm-up and cosine to 1e-6, weight decay
    # 1e-4 constant, crops 0.14-1 / 0.05-0.14; the rest are main_dino.py's defaults (teacher temperature
    # 0.04 without warm-up, K = 65536, no BatchNorm in the head). torchvision's ResNet-50 init (no
    # zero-init residual BN). Their run used batch 8 x 64 = 512; the linear lr scaling covers 256.
    c.model = models.model_config("resnet", depth=50, width=1, zero_init_last_bn=False)
    c.data.crop_scale = (0.14, 1.0)
    c.dino.local_crop_scale = (0.05, 0.14)
    c.dino.teacher_temp = 0.04
    c.dino.teacher_temp_warmup_steps = 0
    c.optim.update(name="sgd", base_lr=0.03, momentum=0.9, weight_decay=1e-4, weight_decay_end=-1.0,
                   end_lr_factor=1e-6 / (0.03 * c.batch_size / 256))


def _runlocal(c, *, vit: bool) -> None:
    # Minutes on 2 CPU cores, with a small head and short schedules. 0.996 keeps the teacher at ~70 % of
    # its random init for a whole run this short; a random network barely depends on its input, so such
    # a teacher is uniform and the student copies it.
    c.dino.hidden_dim = 128
    c.dino.bottleneck_dim = 32
    c.dino.teacher_temp_warmup_steps = 0
    c.dino.teacher_temp_epoch_steps = 1
    c.dino.momentum_teacher = 0.9
    c.dino.freeze_last_layer_steps = 20
    c.dino.health_check_after_steps = 100
    if vit:
        # A 4-block ViT (width 64, patch 8) on 2 x 32 px + 4 x 16 px crops, DINO's centring, AdamW.
        config_lib.apply_runlocal(c, image_size=32, probe_size=32)
        c.model.update(variant="S/8", width=64, depth=4, num_heads=4, mlp_dim=128, image_size=32,
                       drop_path_rate=0.0)
        c.data.crop_scale = (0.3, 1.0)
        c.dino.num_local_crops = 4
        c.dino.local_image_size = 16
        c.dino.local_crop_scale = (0.08, 0.3)
        c.dino.num_prototypes = 256
        c.dino.teacher_temp = 0.04
        c.optim.base_lr = 5e-4
        c.optim.end_lr_factor = 0.01
    else:
        # The encoder of the other :runlocal configs (ResNet-18, base width 16, 48 px crops) with LARS,
        # weight decay 1e-6 (no schedule on it) and the lr of SwAV's :runlocal run.
        config_lib.apply_runlocal(c, image_size=48, probe_size=64)
        c.model = models.model_config("resnet", depth=18, width=1, base_width=16)
        c.data.crop_scale = (0.25, 1.0)
        c.dino.local_image_size = 24
        c.dino.local_crop_scale = (0.08, 0.25)
        c.dino.num_local_crops = 2
        c.optim.update(name="lars", base_lr=1.2, lr_scaling="linear", weight_decay=1e-6, weight_decay_end=-1.0,
                       warmup_steps=30, end_lr_factor=0.0)
        c.augment = augment.preset("azizi_cxr")
        # At batch 64 DINO's centring cannot keep the teacher image-specific: the head's output turns
        # the same for every image within ~10 steps (the common-mode part of the gradient goes into
        # the biases, which LARS does not scale down) and the teacher is uniform by step ~100. What
        # keeps it learning (validation split, 300 steps): DINOv2's Sinkhorn-Knopp teacher, which
        # cannot be uniform while its inputs differ, with K = 64 prototypes for the 128 teacher rows of
        # a batch (K = 256 leaves each prototype half a sample and the codes arbitrary), teacher
        # temperature 0.02 (SwAV's :runlocal epsilon) and BatchNorm in a 2-layer head (DINO's
        # use_bn_in_head; 2 layers as SwAV's head: at 600 steps +0.087 against +0.061 with DINO's 3).
        c.dino.centering = "sinkhorn_knopp"
        c.dino.num_prototypes = 64
        c.dino.teacher_temp = 0.02
        c.dino.num_head_layers = 2
        c.dino.use_bn_in_head = True
        c.total_steps = 600


# Continued pretraining (RAD-DINO's recipe: a foundation ViT trained further on the user's images).
CONTINUED_EPOCHS = 30


def _source_model(init: str) -> dict:
    """The model fields of the export / converted checkpoint the run continues from (its config.json)."""
    from medssl_jax import checkpoint

    return dict(checkpoint.load_export_config(init)["model"])


def _continued_pretraining(c, args, source: dict) -> None:
    """Student and teacher start from `args.init` (the teacher copies the student at step 0); the DINO head
    is fresh. What changes against pretraining from scratch, and why:
    - the model is the checkpoint's own (every field from its config.json, input normalisation included);
      crops of any size run through it (the ViT resamples learned positions in-graph; RoPE needs none);
    - the heads learn on a frozen backbone first (`optim.frozen_encoder_steps`, one epoch): random heads
      would otherwise send large, meaningless gradients into a good backbone (users of dinov2 #204 saw
      kNN accuracy collapse within 20k images that way); the optimiser's moments warm up meanwhile;
    - a tenth of DINO's from-scratch lr, with DINOv2's layer-wise lr decay 0.9 and patch-embedding lr x0.2
      (ssl_default_config.yaml), so early layers move least;
    - DINOv2's objective for its checkpoints: Sinkhorn-Knopp teacher, KoLeo 0.1, iBOT's masked-patch term
      (weight 1, half the global crops with 10-50 % of their patches masked; ViTs), teacher momentum
      0.992 -> 1, teacher temperature 0.04 -> 0.07 over the first third of the run, DINOv2's crop scales;
    - drop path as the source's recipe would have it (0.1 for ViT-S/B; DINOv2 used up to 0.4 for g); for a
      DINOv3 (RoPE) source DINOv3's training-time coordinate rescaling in [1/2, 2] (`rope_rescale`), off in
      the teacher and in the export."""
    c.init = args.init
    remat = bool(c.model.get("remat", False))  # FSDP's rematerialised blocks (set above for ViT-L and g)
    fields = {k: v for k, v in source.items() if k != "name" and v is not None}
    c.model = models.model_config(source["name"], **fields)
    if remat:
        c.model.remat = True
    epoch = args.steps_per_epoch
    c.total_steps = args.epochs * epoch
    c.dino.centering = "sinkhorn_knopp"
    c.dino.koleo_weight = 0.1
    c.dino.momentum_teacher = 0.992
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp_warmup_steps = c.total_steps // 3
    c.dino.teacher_temp_epoch_steps = epoch
    c.dino.freeze_last_layer_steps = epoch
    c.dino.health_check_after_steps = c.total_steps // 3
    c.data.crop_scale = (0.32, 1.0)
    c.dino.local_crop_scale = (0.05, 0.32)
    c.optim.update(frozen_encoder_steps=epoch, warmup_steps=2 * epoch, base_lr=0.1 * c.optim.base_lr)
    if source["name"] == "vit":
        c.model.drop_path_rate = 0.0 if args.runlocal else 0.1
        c.optim.update(layer_decay=0.9, patch_embed_lr_mult=0.2)
        c.dino.ibot_weight = 1.0  # DINOv2's masked-patch term, on the DINO head (fresh, like the mask token)
        if source.get("position") == "rope":
            c.model.rope_rescale = 2.0  # DINOv3's pretraining augmentation of the RoPE coordinates
    if source["name"] == "convnext":  # DINOv3's ConvNeXts; every crop at least their total stride, 32 px
        c.model.drop_path_rate = 0.0 if args.runlocal else 0.1
        config_lib.crops_at_least(c, 32)
    if args.runlocal:
        # Minutes on 2 CPU cores: the 600-step :runlocal run at 32 px global / 16 px local crops, the first
        # 50 steps heads only, the teacher temperature at 0.07 after 100 steps.
        c.total_steps = 600
        c.dino.teacher_temp_warmup_steps = 100
        c.dino.teacher_temp_epoch_steps = 1
        c.dino.freeze_last_layer_steps = 20
        c.dino.health_check_after_steps = 100
        c.optim.update(frozen_encoder_steps=50, warmup_steps=100)
        # Chosen on the phantoms' validation split (BENCHMARKS.md, "Continued pretraining"): with iBOT the
        # probe was 0.630, without 0.634 (its loss stayed near 3.6 on 16 patches per crop): off here.
        c.dino.ibot_weight = 0.0
