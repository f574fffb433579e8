r"""SwAV pretraining (online feature clustering; the clustering half of Ghesu et al. 2022).

Swapped prediction between crops: codes from Sinkhorn equipartition of the two global crops'
prototype scores predict every other crop. SwAV's single-node recipe because Ghesu et al.'s values
are not public (see methods.md section 1 and `medssl_jax.methods.swav.ghesu_config`): ResNet-50,
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

from medssl_jax.methods import swav


def get_config(arg=None):
    return swav.ghesu_config(arg, method="swav")
