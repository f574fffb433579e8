r"""Ghesu et al. 2022 hybrid: SwAV clustering + lambda * NT-Xent, with optional supervision.

    loss = L_swav + contrastive_weight * NT-Xent(global crop 1, global crop 2)
                  + supervised_weight * BCE(linear head on the global crops' features, labels)

The paper ("contrastive learning and online feature clustering ... with optional supervision",
arXiv 2201.01283 / JMI 9(6) 064503) does not publish the weights: contrastive_weight = 1.0 and
the SimCLR temperature 0.1 are defaults, supervised_weight alpha = 0 (off) unless given; records
without a label (NaN) contribute nothing to the BCE. Everything else is configs/swav.py (SwAV's
single-node recipe: ResNet-50, batch 256, 2 x 224 + 6 x 96 crops, K = 3000, epsilon 0.05, tau 0.1,
prototype freeze 5005 steps, queue 3840 from step 15,000, LARS lr 0.6). Arguments: `micle` (the two
global crops are two images of one patient, MICLe-style positives), `supervised=ALPHA` with
`num_labels=L` (the store's label count; the batch must then carry labels), `store=PATH`, `runlocal`.

Offline smoke run on the embedded phantom dataset (2 x 48 + 2 x 24 px crops, tiny ResNet-18, batch 64, 300
steps, queue 1024 from step 20, epsilon 0.02; writes WORKDIR/eval/summary.json and prints the
linear-probe mean AUC next to the random-init encoder's). It checks the plumbing, not the method:
measured 2026-11-22 on phantoms v5 (4 min 51 s wall on 2 shared, busy CPU cores): linear-probe
mean AUC 0.538 vs 0.537 for the random-init encoder (at this scale the NT-Xent term stays near its
chance value ln 127 and the SwAV term near ln K: no useful features yet).

  python -m medssl_jax.main --config=configs/hybrid.py:runlocal --workdir=/tmp/hybrid_local

Full run with patient positives on an ingested store:

  python -m medssl_jax.main --config=configs/hybrid.py:store=/data/store,micle --workdir=/runs/hybrid_r50

Hardware and runtime: as configs/swav.py (the NT-Xent term on 2 x 256 embeddings is negligible):
~1,900 images/s on one H100 by FLOPs, about 7.5 hours for 200k steps (an estimate; see
BENCHMARKS.md). Expected result (Ghesu et al., abstract): +3 to +7 % AUC over the state of the art
after fine-tuning for CXR abnormality and brain-CT hemorrhage detection, up to 85 % faster
convergence than without pretraining; their data (>100M images) and exact recipe are not public.
"""

from medssl_jax.methods import swav


def get_config(arg=None):
    return swav.ghesu_config(arg, method="hybrid")
