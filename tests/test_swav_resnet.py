"""methods/swav.py with the real encoder from the config (tiny ResNet-18): build, init, one loss step."""
import math

import jax
import numpy as np

from medssl_jax import methods
from medssl_jax.methods import swav
from test_swav import make_batch, make_config, run_loss


def test_build_with_resnet_runs_one_step():
    config = make_config("hybrid")
    config.model.depth = 18
    config.model.base_width = 4
    config.hybrid.supervised_weight = 1.0
    config.hybrid.num_labels = 2
    model = swav.build(config)
    batch = make_batch(0, num_labels=2)
    variables, state = jax.jit(lambda b: swav.init(model, jax.random.PRNGKey(0), b, config))(batch)
    assert set(methods.encoder_variables(variables)["params"]) >= {"stem", "stage4_block1"}

    loss, (batch_stats, _, metrics) = run_loss(model, config, variables, state, batch)
    assert math.isfinite(float(loss))
    assert {"swav_loss", "contrastive_loss", "supervised_loss"} <= set(metrics)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), batch_stats, variables["batch_stats"])
    assert all(jax.tree.leaves(changed["encoder"])) and all(jax.tree.leaves(changed["head"]))
