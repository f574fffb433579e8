r"""Linear probe on frozen features of any encoder (multi-label logistic regression, C chosen on validation).

Probe a pretraining run's export, a converted checkpoint, or a random-init encoder on the same store
(the default store is the embedded phantom dataset; `store=PATH` or --config.data.store=PATH for an
ingested one). Splits are patient-wise and deterministic (E/splits.json, identical for every run on the
store), so the runs can be compared pairwise:

  python -m medssl_jax.main --config=configs/linear_probe.py:store=/data/chexpert \
      --config.init=/runs/micle_r50/export --workdir=/evals/micle_probe
  python -m medssl_jax.main --config=configs/linear_probe.py:store=/data/chexpert \
      --config.init=/ckpt/dinov2_vitb14 --workdir=/evals/dinov2_probe      # from medssl_jax.convert
  python -m medssl_jax.main --config=configs/linear_probe.py:store=/data/chexpert,init=random \
      --workdir=/evals/random_probe                                          # config.model = ResNet-50
  python -m medssl_jax.compare /evals/micle_probe /evals/dinov2_probe /evals/random_probe --out=/evals/report

Label efficiency (one probe per fraction of the train patients, nested subsets; E/eval holds the largest
fraction plus label_fractions.json, E/fractions/f<F>/eval each fraction) and robustness curves:

  python -m medssl_jax.main --config=configs/linear_probe.py:store=/data/chexpert \
      --config.init=/runs/micle_r50/export --config.label_fractions="(0.01, 0.1, 0.25, 0.5, 1.0)" \
      --config.robustness=True --workdir=/evals/micle_probe_fractions

Offline smoke run on the embedded phantom dataset, the store configs/simclr.py:runlocal pretrains on
(2 CPU cores: about 2 minutes; random-init ResNet-18 unless --config.init is given):

  python -m medssl_jax.main --config=configs/linear_probe.py:runlocal --workdir=/tmp/probe_random
  python -m medssl_jax.main --config=configs/linear_probe.py:runlocal \
      --config.init=/tmp/simclr_local/export --workdir=/tmp/probe_simclr
  python -m medssl_jax.compare /tmp/probe_simclr /tmp/probe_random --out=/tmp/probe_report

Measured on the phantoms (generator v5, 2 busy shared CPU cores, 2-3 minutes wall, ~25 s CPU per run):
the export of a 300-step configs/micle.py:runlocal run probes to test mean AUC 0.59 against 0.49 for the
random-init encoder (paired bootstrap p < 0.001; effusion and cardiomegaly carry the difference).

Hardware and runtime (an estimate, not a measurement): the features are one forward pass per image
(cached in E/cache, so fractions and reruns do not recompute them); a ResNet-50 forward at 224 px runs
at several thousand images/s on one H100, so extraction over CheXpert (~224k images) takes minutes and
is bound by the host pipeline. The logistic regressions (scikit-learn lbfgs, one per label, C value and
label fraction) dominate: on a CheXpert-sized train split with 2048-d features expect seconds to a minute
per fit, i.e. tens of minutes for 14 labels x 5 C values on the CPU; the features of the train split sit in
host memory (~1.8 GB for 224k x 2048 float32). Measure the forward rate with
`python -m medssl_jax.evaluate.linear_probe --bench --init=DIR [--store=STORE]`.
"""

import ml_collections as mlc

from medssl_jax import config_lib
from medssl_jax.evaluate import linear_probe


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, store="", init="")
    c = linear_probe.reference_config()
    c.data.store = args.store
    c.init = args.init
    # Architecture for init='random' (an export or converted checkpoint brings its own), every field settable
    # with --config.model.FIELD. A random ResNet is probed with every residual branch active at init and with
    # every branch starting as its shortcut (random_zero_init_grid; the better on validation is kept per label
    # fraction), its BatchNorm statistics from the train images (evaluate/encoders.py: fair_random_init).
    c.model = mlc.ConfigDict({"name": "resnet", "depth": 50, "width": 1, "base_width": 64, "zero_init_last_bn": False,
                              "stem_pool": "same", "cifar_stem": False})
    c.image_size = 224
    c.batch_size = 256
    if args.runlocal:
        # The store and encoder of the :runlocal pretraining configs (phantoms at 64 px; ResNet-18, base width 16).
        c.init = args.init or "random"
        c.data.update(config_lib.RUNLOCAL_PHANTOMS)  # the store the :runlocal pretraining configs use
        c.image_size = 64  # whole phantom images, as configs/simclr.py:runlocal's own probe sees them
        c.batch_size = 128
        c.model.depth, c.model.base_width = 18, 16
        c.label_fractions = (0.1, 0.25, 0.5, 1.0)
        c.robustness = True
    return c
