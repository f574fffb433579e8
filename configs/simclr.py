r"""SimCLR pretraining on chest X-rays (Azizi et al. 2021): two views of the same image are positives.

The same recipe as configs/micle.py without patient-grouped positives: an element is one image.
NT-Xent over the global batch,
ResNet-50 (1x; `variant=r50x4` or `r152x2` for the paper's larger encoders), LARS, chest X-ray
augmentation (random crop, brightness/contrast jitter 0.5, rotation <= 45 deg, flip, no blur), then a
linear probe on the exported encoder.

Offline smoke run on the embedded phantom dataset (2 CPU cores: about 5 minutes end to end; prints the
linear-probe mean AUC, clearly above the random-init encoder's; writes WORKDIR/eval/summary.json):

  python -m medssl_jax.main --config=configs/simclr.py:runlocal --workdir=/tmp/simclr_local

Paper-scale run (ResNet-50 1x, batch 1024, 100k steps, 224 px) on an ingested chest X-ray store
(e.g. CheXpert or MIMIC-CXR via `python -m medssl_jax.ingest`), two-stage from ImageNet SimCLR weights:

  python -m medssl_jax.main --config=configs/simclr.py:store=/data/cxr_store \
      --config.init=/ckpt/simclr_imagenet_r50 --workdir=/mnt/shared/runs/simclr_r50

Hardware and runtime: 100k steps x 2048 views = 205M views. At the ~6,000 views/s per H100 that the
design targets for this step (an estimate, not a measurement of this config: see BENCHMARKS.md) that is
about 9.5 hours on one H100 or 1.2 hours on 8 (multi-node: launch/). Expected result: Azizi et al. report MICLe gains only on
dermatology; for CheXpert, SimCLR ImageNet->CheXpert pretraining followed by fine-tuning reached mean
AUC 0.7729 (R152 2x) over the 5 competition labels. A linear probe is below fine-tuning; compare
against configs/micle.py and a random-init probe with `python -m medssl_jax.compare`.
"""

from medssl_jax import config_lib


def get_config(arg=None):
    return config_lib.azizi_cxr_config(arg, method="simclr")
