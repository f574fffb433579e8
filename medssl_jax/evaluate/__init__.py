"""Evaluation: everything that turns an encoder into numbers a user can trust.

- encoders.py: the encoder an evaluation starts from (an export, a converted checkpoint, the fair random
  init) with its input normalisation; workspace.py: the checks and the store every evaluation opens first;
  splits.py: all patient-wise splitting (evaluation splits, label fractions, hash-held-out patients);
  features.py: frozen features, eval-preprocessed images, the feature-extraction benchmark.
- Modes of `python -m medssl_jax.main` (config.mode): linear_probe.py (probe.py is its fitter),
  finetune.py (through the one train loop, methods/supervised.py), transfer.py (both, per init and label
  fraction, with the comparison); after_pretraining.py is the probe and baseline that end a pretraining run.
- Numbers from predictions: metrics.py (sklearn-identical AUC, Youden), bootstrap.py (paired and
  seed-and-image bootstraps), robustness.py; records.py writes and reads an evaluation workdir,
  report.py compares several (`python -m medssl_jax.compare`).
"""
