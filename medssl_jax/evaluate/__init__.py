"""Evaluation: metrics (sklearn-identical AUC, Youden), paired bootstrap, robustness, reports.

The lead's probe.py / features.py train heads and extract features; the modules here only consume
predictions (probabilities + labels) and never train anything.
"""
