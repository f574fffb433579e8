r"""SimCLR on chest X-rays (Azizi et al. 2021): the two positives are two views of the same image.

The recipe, hardware and runtime are those of configs/micle.py (ResNet-50 1x by default, `variant=r50x4`
or `r152x2`; LARS, batch 1024, 100k steps; crop + brightness/contrast jitter 0.5 + rotation <= 45 deg +
flip, no blur); only the sampler differs: an element is one image, not one patient case, so two images
of the same patient can be negatives of each other.

  python -m medssl_jax.main --config=configs/simclr.py:runlocal --workdir=/tmp/simclr_local
  python -m medssl_jax.main --config=configs/simclr.py:store=/data/cxr_store \
      --config.init=/ckpt/simclr_imagenet_r50 --workdir=/mnt/shared/runs/simclr_r50

The runlocal run is MICLe's recipe without patient grouping (LARS lr 3.0, chosen on the phantoms'
validation split at 600 steps, probe mean AUC; fair random init 0.597: 1.0 -> 0.709, 2.0 -> 0.749,
3.0 -> 0.796 (a second seed: 0.820), 5.0 -> 0.788). Measured from a clean clone on 2 CPU cores
(2026-12-01): 3 min 38 s; test split (1749 images) linear-probe mean AUC 0.778 vs 0.587 random init,
difference +0.192 [95% CI +0.170, +0.212], p < 0.001; it writes the same WORKDIR/eval/summary.json.
On phantoms v6 MICLe (0.752; 0.736 with the code of 2026-12-04) does not beat SimCLR (0.775 then; one seed each; between seeds the validation AUC moved by
0.025 for SimCLR and 0.07 for MICLe, so do not read a ranking of the two into one run).

Expected result: on CheXpert, Azizi et al. report mean AUC 0.7729 over the 5 competition labels for
ImageNet->CheXpert SimCLR with R152 2x after fine-tuning; MICLe's reported gain is on dermatology.
Compare the two with `python -m medssl_jax.compare`.
"""

from medssl_jax import config_lib


def get_config(arg=None):
    """The arguments of configs/micle.py (runlocal, variant, store)."""
    args = config_lib.parse_arg(arg, runlocal=False, variant="r50x1", store="")
    c = config_lib.load_config("micle", arg)  # Azizi et al.'s recipe, one sampler apart
    c.method = "simclr"
    c.data.sampler = "pairs"  # an element is one image; its two views are two crops of it
    if args.runlocal:
        # LARS lr chosen on the phantoms' validation split (600 steps, probe mean AUC; fair random init
        # 0.597): 1.0 -> 0.709, 2.0 -> 0.749, 3.0 -> 0.796, 5.0 -> 0.788.
        c.optim.base_lr = 3.0
    return c
