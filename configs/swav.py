r"""SwAV pretraining (online feature clustering; the clustering half of Ghesu et al. 2022).

Swapped prediction between crops: codes from Sinkhorn equipartition of the two global crops'
prototype scores predict every other crop. SwAV's single-node recipe because Ghesu et al.'s values
are not public: ResNet-50,
batch 256, multi-crop 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), 3000 prototypes,
epsilon 0.05, 3 Sinkhorn iterations, temperature 0.1, prototypes frozen for 1 epoch, a 3840-long
queue from epoch 15 (epochs of the store's train split, as main_swav.py counts them), LARC (apex's,
trust 0.001, no clip, every parameter; medssl_jax/optim.py) lr 0.6 cosine to 0.0006, wd 1e-6, then a
linear probe of the encoder.

Offline run on the embedded phantom dataset (phantoms v6, 2000 patients; 2 x 48 + 2 x 24 px crops, tiny
ResNet-18, batch 64, 600 steps, queue 1024 from step 20, epsilon 0.02 (with SwAV's 0.05 the codes drift
to uniform at batch 64 and check_health stops the run), K = 64; the probe sees whole 64 px images).
LARS (the optimiser these settings were tuned with; LARC not re-tuned at this scale) lr chosen on the
validation split (probe mean AUC; fair random init 0.597): 0.6 -> 0.651, 1.2 ->
0.746, 2.4 -> 0.734. Measured from a clean clone on 2 CPU cores (2026-12-01): 4 min 46 s; test split
(1749 images) linear-probe mean AUC 0.696 vs 0.587 random init, difference +0.109 [95% CI +0.086,
+0.131], p < 0.001. It writes WORKDIR/eval/summary.json (`vs_random_init`):

  python -m medssl_jax.main --config=configs/swav.py:runlocal --workdir=/tmp/swav_local

Full run on an ingested store (chest X-rays; for a mixed CT/MR/US/X-ray store add
--config.intensity.modality_aware=True, see the README's "Several modalities in one store"):

  python -m medssl_jax.main --config=configs/swav.py:store=/data/store --workdir=/runs/swav_r50

Hardware and runtime: 200k steps x 256 images x (2 x 224 + 6 x 96) crops. The 6 local crops cost
6 x (96/224)^2 = 1.1 global crops of FLOPs, so a step is ~3.1 global-crop forward/backward passes per
image; at the ~6,000 views/s (224 px) of a plain Flax ResNet-50 on one H100 (the design figure; not a
measurement of this config, see BENCHMARKS.md) that is ~1,900 images/s, about 7.5 hours on one H100.
Expected result: no published numbers for this exact recipe on medical data; Ghesu et al. report
+3 to +7 % AUC over ImageNet initialisation after fine-tuning (CXR abnormality, brain-CT hemorrhage)
for their (SwAV + contrastive) hybrid, see configs/hybrid.py. On ImageNet, SwAV 200 epochs at batch
256 with this recipe reaches 72.0 % linear top-1 (swav README).
"""

from medssl_jax import augment, config_lib
from medssl_jax.methods import swav


def get_config(arg=None):
    """Arguments: `runlocal` (a CPU-sized run on the embedded phantom dataset), `store` (an ingested
    store; '' = embedded phantoms), `encoder` ('' = the recipe's ResNet, or DINOv3's convnext_tiny / _small /
    _base / _large)."""
    args = config_lib.parse_arg(arg, runlocal=False, store="", encoder="")
    c = config_lib.pretrain_config()
    c.method = "swav"
    swav.extend_config(c)
    c.data.store = args.store
    c.data.sampler = "pairs"
    # SwAV's single-node recipe (swav_200ep_bs256_pretrain.sh): Ghesu et al.'s values are
    # not public. 2 x 224 (scale 0.14-1) + 6 x 96 (0.05-0.14) crops, K = 3000, epsilon 0.05, 3 Sinkhorn
    # iterations, tau 0.1 (swav.extend_config's defaults for the rest).
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
    # SwAV's LARC: apex LARC (trust 0.001, clip=False) around SGD momentum 0.9, on every parameter; lr 0.6
    # without warm-up, cosine to 0.0006 (not SimCLR's LARS, see medssl_jax/optim.py).
    c.optim.name = "larc"
    c.optim.base_lr = 0.6
    c.optim.warmup_steps = 0
    c.optim.end_lr_factor = 0.001
    # In epochs of the train split (turned into steps when training starts, config_lib.resolve_durations):
    # prototypes frozen for 1 epoch, a 3840 queue from epoch 15.
    c.swav.freeze_prototypes_steps, c.swav.freeze_prototypes_epochs = -1, 1.0
    c.swav.queue_length = 3840
    c.swav.queue_start_steps, c.swav.queue_start_epochs = -1, 15.0
    c.log_every = 100
    c.checkpoint_every = 2000
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
        # The :runlocal learning rates were chosen with SimCLR's LARS (BN and biases not adapted); LARC was
        # not re-tuned at this scale, so the CPU run keeps LARS. lr chosen on the phantoms' validation
        # split (600 steps, probe mean AUC; fair random init 0.597): 0.6 -> 0.651, 1.2 -> 0.746, 2.4 -> 0.734.
        c.optim.name = "lars"
        c.optim.base_lr = 1.2
        c.optim.end_lr_factor = 0.0
        c.head.hidden_dim = 128
    if args.encoder:
        config_lib.use_convnext(c, args.encoder)
    return c
