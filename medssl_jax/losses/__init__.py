"""Losses: pure keyword-only functions over (global) arrays.

Each module owner adds one import line here for their module.
"""

from medssl_jax.losses.contrastive import ntxent
from medssl_jax.losses.supervised import bce_with_pos_weight, pos_weight_from_labels
from medssl_jax.losses.clustering import sinkhorn, swav_loss
from medssl_jax.losses.koleo import koleo
from medssl_jax.losses.dino import dino_loss, ibot_loss, teacher_targets, updated_center
