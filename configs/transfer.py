r"""Transfer study: linear probe and fine-tuning of several initialisations at several label fractions.

Each init (a pretraining export, a converted checkpoint, or 'random') is probed and fine-tuned on the same
patient-wise splits; fine-tuning follows the protocol of evaluate/finetune.py (each init its own lr grid,
lower backbone lr and LP-FT for pretrained encoders, with full augmentation or flips only under :runlocal,
warm-up + cosine over a budget chosen on validation, 3 seeds of each of the best 2 settings, the better seed
mean chosen). W/transfer.json, W/report.md, W/label_efficiency.png and W/convergence.png hold the
results; rerunning the command resumes an interrupted study.

  # Azizi et al.'s label-efficiency comparison on an ingested chest X-ray store (ResNet-50, 224 px)
  python -m medssl_jax.main --config=configs/transfer.py:store=/data/stores/chexpert \
      --config.inits="('/runs/micle_r50/export', '/runs/simclr_r50/export', 'random')" --workdir=/evals/transfer

  # On 2 CPU cores: a MedMNIST set, SimCLR pretrained on its own train split (README, "Public data")
  python -m medssl_jax.main --config=configs/transfer.py:runlocal,store=stores/breastmnist \
      --config.inits="('runs/breast_simclr/export', 'random')" --workdir=evals/breast_transfer
  # trying settings on validation only: the same with --config.read_test=False (no test prediction, no test
  # AUC in the log or the files); when they are final, the same command without it reads test once

Measured (BENCHMARKS.md, "Transfer", 2 CPU cores): 2026-12-06, the BreastMNIST command above took 25 min 39 s
(124 fine-tuning runs); fine-tune SSL - random at 1 / 10 / 25 / 100 % labels -0.042 / -0.002 / -0.003 / +0.001,
every CI including 0, while the linear probe gains +0.099 / +0.168 / +0.231 / +0.116 (CIs above 0 from 10 % on;
the random probe's residual-branch init chosen on validation). 2026-12-07, with the augmentation grid (216
runs, 1.75x the steps: 50 min 21 s for BreastMNIST, timed from scratch) and an AdamW SimCLR export:
RetinaMNIST +0.033 / +0.025 / +0.042 / +0.001 (CIs above 0 at 1 % and 25 %), BreastMNIST +0.017 / +0.027 /
+0.021 / -0.010 (every CI including 0).
The phantoms at 10 % labels (SimCLR :runlocal export, 64 min 17 s): -0.056 [-0.079, -0.035]; MICLe -0.036
[-0.057, -0.016], random init ahead (a from-scratch ResNet starts its residual branches at zero and can use
a higher lr; BENCHMARKS.md); at 1 % (27 min 5 s) ties: -0.012 [-0.036, +0.016], MICLe +0.003 [-0.015, +0.019];
at 100 % (61 min 34 s) -0.012 [-0.018, -0.008] (0.979 vs 0.992, seed spreads 0.002 / 0.003), MICLe -0.007
[-0.011, -0.003] (0.985); at 25 % -0.020 [-0.031, -0.008] (0.951 vs 0.972), MICLe -0.017 [-0.029, -0.005]
(0.955). Per label (report.md) the gap is
mostly the nodule, a blob of a few pixels the pretrained features barely carry (-0.059 at 25 %, -0.041 at 100 %).
At paper scale every fine-tune is a configs/finetune.py run (ResNet-50, 224 px, 10 or 30 epochs): 17
(4 lrs x 2 backbone lrs + 3 LP-FT lrs for 10 epochs, the best 2 of them for 30, + 2 more seeds of each of the
best 2) runs per pretrained init and fraction, 10 for random init.
"""

import ml_collections as mlc

from medssl_jax import config_lib
from medssl_jax.evaluate import transfer


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, store="")
    c = transfer.reference_config()
    c.data.store = args.store
    c.label_fractions = (0.01, 0.1, 0.25, 1.0)
    c.linear_probe = config_lib.load_config("linear_probe", "runlocal" if args.runlocal else None)
    c.finetune = config_lib.load_config("finetune", "runlocal" if args.runlocal else None)
    c.model = mlc.ConfigDict(c.finetune.model.to_dict())
    c.image_size = 224
    for arm in (c.linear_probe, c.finetune):
        arm.robustness = False
    if args.runlocal:
        c.data.update(config_lib.RUNLOCAL_PHANTOMS)
        c.image_size = -1  # the stored images' size: 64 for the phantoms, 28 for MedMNIST
        c.num_resamples = 1000
    return c
