r"""Full fine-tuning (encoder + linear head) from an export, a converted checkpoint or random init.

The Azizi et al. protocol: end-to-end fine-tuning with a new linear head, per-label sigmoid BCE (pos_weight
from the train records) for chest X-ray, SGD with Nesterov momentum (SimCLR's transfer recipe),
augmentation = random-resized crop + flip on the host and the azizi_cxr jitter + rotation on the device,
224 px. Like the paper (lr and steps grid-searched on validation per task and init) every init gets its
own setting from a grid chosen on a patient-wise validation split, never the test split: lr (per 256
images) x budget (warm-up 10 %, cosine to 0) x, for a pretrained encoder, a 10x lower backbone lr, plus for
a pretrained encoder LP-FT settings (the head starts from the linear probe, Kumar et al. 2022); the budgets
by successive halving (every setting at the short budget, the best 2 at the long one); the best 2 settings
are then trained with 3 seeds each and the better seed mean on validation is chosen (evaluate/finetune.py).
The grid values are ours.

  python -m medssl_jax.main --config=configs/finetune.py:store=/data/chexpert \
      --config.init=/runs/micle_r50/export --workdir=/evals/micle_ft
  python -m medssl_jax.main --config=configs/finetune.py:store=/data/chexpert,init=random \
      --workdir=/evals/random_ft                      # from scratch (the convergence baseline)
  python -m medssl_jax.compare /evals/micle_ft /evals/random_ft --out=/evals/ft_report

Several inits, label fractions, the linear probe beside it, CIs over seeds and test images and Ghesu's
convergence figure in one command: configs/transfer.py. Label efficiency alone (Azizi: 10-90 % of the
training labels; nested patient subsets), robustness curves and the zero-shot distribution-shift test on
another store (Azizi: CheXpert -> ChestX-ray14, the shared labels):

  python -m medssl_jax.main --config=configs/finetune.py:store=/data/chexpert \
      --config.init=/runs/micle_r50/export --config.label_fractions="(0.1, 0.25, 0.5, 1.0)" \
      --config.robustness=True --config.shift_store=/data/nih_cxr14 \
      --config.label_map="(('Effusion', 'Pleural Effusion'),)" --workdir=/evals/micle_ft_all

Offline run on the embedded phantom dataset or a small store (:runlocal: ResNet-18 base width 16, batch 64,
lrs 0.03 / 0.1 / 0.3 / 1.0 / 3.0 per 256 images, backbone lr x1 or x0.1 for an export, plus LP-FT at lrs
0.001 / 0.003 / 0.01 / 0.03 for an export, each with the full augmentation and with flips only, each for
300 steps and the best 2 of each augmentation for 1000; 3 seeds of the best 2 settings):

  python -m medssl_jax.main --config=configs/finetune.py:runlocal --workdir=/tmp/ft_random
  python -m medssl_jax.main --config=configs/finetune.py:runlocal --config.init=/tmp/simclr_local/export \
      --workdir=/tmp/ft_simclr

Measured results (BreastMNIST, RetinaMNIST and the phantoms, per init and label fraction, with runtimes):
BENCHMARKS.md, "Transfer". Hardware at paper scale (an estimate, not a measurement): a ResNet-50 fine-tuning
step costs about a third of a SimCLR pretraining step (one view, no projection head), so roughly
6,000-9,000 images/s on one H100 at 224 px: one 30-epoch run over CheXpert's ~180k training images is
on the order of 15-25 minutes, and the grid (4 lrs x 2 backbone lrs + 3 LP-FT lrs at 10 epochs, the best 2 at
30 epochs, + 2 more seeds of each of the best 2 settings) is 17 runs, 2 to 6 of them 30 epochs long, per
pretrained init and label fraction.
"""

import ml_collections as mlc

from medssl_jax import config_lib
from medssl_jax.evaluate import finetune


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, store="", init="")
    c = finetune.reference_config()
    c.data.store = args.store
    c.init = args.init
    # Architecture for init=random: the init a pretraining run starts from (zero_init_last_bn=True, every block
    # starts as its shortcut: a training aid for from-scratch training); every field settable on the command line.
    c.model = mlc.ConfigDict({"name": "resnet", "depth": 50, "width": 1, "base_width": 64, "zero_init_last_bn": True,
                              "stem_pool": "same", "cifar_stem": False})
    c.image_size = 224
    c.batch_size = 256
    # Kornblith et al. / SimCLR transfer: Nesterov SGD, lr per 256 images from a log grid, warm-up + cosine over
    # a budget chosen on validation (10 and 30 epochs of the whole train split), a 10x lower backbone lr tried for
    # pretrained encoders; 3 seeds of each of the best 2 settings.
    c.optim.name = "sgd"
    c.optim.nesterov = True
    c.optim.momentum = 0.9
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 0.0
    c.lr_grid = (0.01, 0.03, 0.1, 0.3)
    c.budget_grid = (10.0, 30.0)
    c.budget_unit = "epochs"
    c.backbone_lr_mults = (1.0, 0.1)
    # LP-FT (Kumar et al. 2022) for pretrained encoders: the head starts from the fraction's linear probe and
    # the whole network is fine-tuned at an lr too small to train a fresh head.
    c.probe_head_lr_grid = (0.001, 0.003, 0.01)
    # Successive halving over the budgets: every setting for 10 epochs, the best 2 of them again for 30.
    c.budget_top_k = 2
    c.seeds = 3
    c.seed_top_k = 2  # the best 2 settings run all 3 seeds; the better seed mean on validation is chosen
    c.crop_scale = (0.08, 1.0)
    c.data.num_workers = 8
    if args.runlocal:
        c.init = args.init or "random"
        c.data.update(config_lib.RUNLOCAL_PHANTOMS)  # the store the :runlocal pretraining configs use
        c.data.num_workers = 0
        c.image_size = 64  # the phantoms' native size
        c.batch_size = 64
        c.crop_scale = (0.5, 1.0)
        c.model.depth, c.model.base_width = 18, 16
        # Five lrs, not three: with (0.1, 0.3, 1.0) a SimCLR export chose 0.1 and random init 1.0 at every phantom
        # label fraction, both at an end of the grid (BENCHMARKS.md, "Transfer / Phantoms").
        c.lr_grid = (0.03, 0.1, 0.3, 1.0, 3.0)
        # LP-FT's lrs: on BreastMNIST at 10 % and 25 % labels its validation score fell monotonically from lr
        # 0.001 to 0.03 (55 or 137 images: fine-tuning overfits fast; BENCHMARKS.md, "Transfer").
        c.probe_head_lr_grid = (0.001, 0.003, 0.01, 0.03)
        c.budget_grid = (300, 1000)  # ~35 and ~120 epochs of MedMNIST's smallest train split (546 images)
        # Every setting with the configured augmentation and with flips only (the whole image): on BreastMNIST's
        # validation split (1000 steps, one seed) random init at 10 % labels needed the augmentation (0.787 vs
        # 0.673 at lr 0.3) while the SimCLR export at 10 % and 100 % and random init at 100 % did better without
        # it (0.775 vs 0.731, 0.933 vs 0.888, 0.935 vs 0.891); RetinaMNIST's random init at 100 % was mixed.
        c.augment_grid = ("full", "flip")
        c.budget_unit = "steps"
        c.eval_every = 50
        c.log_every = 50
        c.checkpoint_every = 100
    return c
