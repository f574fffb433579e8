r"""SimCLR on chest X-rays (Azizi et al. 2021): the two positives are two views of the same image.

The recipe, hardware and runtime are those of configs/micle.py (ResNet-50 1x by default, `variant=r50x4`
or `r152x2`; LARS, batch 1024, 100k steps; crop + brightness/contrast jitter 0.5 + rotation <= 45 deg +
flip, no blur); only the sampler differs: an element is one image, not one patient case, so two images
of the same patient can be negatives of each other.

  python -m medssl_jax.main --config=configs/simclr.py:runlocal --workdir=/tmp/simclr_local
  python -m medssl_jax.main --config=configs/simclr.py:store=/data/cxr_store \
      --config.init=/ckpt/simclr_imagenet_r50 --workdir=/mnt/shared/runs/simclr_r50

The runlocal run takes about as long as MICLe's (minutes on 2 CPU cores) and writes the same
WORKDIR/eval/summary.json. Expected result: on CheXpert, Azizi et al. report mean AUC 0.7729 over the 5
competition labels for ImageNet->CheXpert SimCLR with R152 2x after fine-tuning; MICLe's reported gain
is on dermatology. Compare the two with `python -m medssl_jax.compare`.
"""

from medssl_jax import config_lib


def get_config(arg=None):
    return config_lib.azizi_cxr_config(arg, method="simclr")
