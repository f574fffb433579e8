"""Optimiser factory: LARS against a NumPy port of SimCLR's LARSOptimizer, masks, schedules, lr scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medssl_jax import optim
from medssl_jax.models import ProjectionHead, ResNet


def _tiny_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
        "bn": {"scale": (1 + 0.1 * rng.normal(size=4)).astype(np.float32),
               "bias": (0.1 * rng.normal(size=4)).astype(np.float32)},
        "dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
    }


def simclr_lars_reference(params, grads_per_step, lrs, *, weight_decay, eta, momentum, excluded,
                          lr_after_momentum=False):
    """NumPy port of google-research/simclr LARSOptimizer._apply_dense, classic_momentum=True.

    `excluded(path)` plays `exclude_from_weight_decay` (= `exclude_from_layer_adaptation`).
    With lr_after_momentum=True it is BYOL's ordering instead (momentum on the scaled gradient, lr after).
    """
    params = {path: w.astype(np.float64) for path, w in params.items()}
    velocity = {path: np.zeros_like(w) for path, w in params.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for path, w in params.items():
            g = grads[path].astype(np.float64)
            if not excluded(path):
                g = g + weight_decay * w
            trust_ratio = 1.0
            if not excluded(path):
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                trust_ratio = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            if lr_after_momentum:
                velocity[path] = momentum * velocity[path] + trust_ratio * g
                params[path] = w - lr * velocity[path]
            else:
                velocity[path] = momentum * velocity[path] + lr * trust_ratio * g
                params[path] = w - velocity[path]
    return params


def _flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lars_matches_simclr_update_order():
    cfg = optim.default_config("lars")
    cfg.base_lr, cfg.warmup_steps, cfg.weight_decay = 1.2, 2, 1e-2
    tx, schedule = optim.make_optimizer(cfg, total_steps=6, batch_size=512)
    params = _tiny_params()
    rng = np.random.default_rng(1)
    grads_per_step = [jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params) for _ in range(5)]

    state = tx.init(params)
    jax_params = params
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)

    lrs = [float(schedule(step)) for step in range(5)]
    assert lrs[:3] == pytest.approx([0.0, 1.2, 2.4])  # warm-up to 1.2 * 512/256, so the lr changes
    reference_args = dict(
        lrs=lrs, weight_decay=1e-2, eta=1e-3, momentum=0.9, excluded=lambda p: p.startswith("bn") or p.endswith("bias"))
    expected = simclr_lars_reference(_flat(params), [_flat(g) for g in grads_per_step], **reference_args)
    got = _flat(jax_params)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-5, atol=1e-7, err_msg=path)
    # The check can tell the orderings apart: BYOL's (lr after momentum) lands elsewhere.
    byol = simclr_lars_reference(_flat(params), [_flat(g) for g in grads_per_step], lr_after_momentum=True,
                                 **reference_args)
    assert not np.allclose(got["conv/kernel"], byol["conv/kernel"], rtol=1e-4)


def test_param_labels_exclude_bn_and_biases():
    labels = optim.param_labels(_tiny_params())
    assert labels == {"conv": {"kernel": "decay"}, "bn": {"scale": "no_decay", "bias": "no_decay"},
                      "dense": {"kernel": "decay", "bias": "no_decay"}}
    flax_names = {"LayerNorm_0": {"scale": 0}, "encoder_norm": {"scale": 0}, "norm1": {"scale": 0},
                  "MlpBlock_0": {"Dense_0": {"kernel": 0, "bias": 0}}, "embedding": {"kernel": 0}}
    assert optim.decay_mask(flax_names) == {
        "LayerNorm_0": {"scale": False}, "encoder_norm": {"scale": False}, "norm1": {"scale": False},
        "MlpBlock_0": {"Dense_0": {"kernel": True, "bias": False}}, "embedding": {"kernel": True}}


def test_decay_mask_on_resnet_and_head_keeps_only_kernels():
    model = ResNet(depth=18, base_width=8)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))["params"]
    head = jax.eval_shape(lambda: ProjectionHead(hidden_dim=16).init(jax.random.key(0), jnp.zeros((2, 64)), train=False))
    tree = {"encoder": params, "head": head["params"]}
    flat_mask = jax.tree_util.tree_flatten_with_path(optim.decay_mask(tree))[0]
    for path, decayed in flat_mask:
        assert decayed == (path[-1].key == "kernel"), path
    assert sum(decayed for _, decayed in flat_mask) == 1 + 8 * 2 + 4 + 2  # stem, 8 blocks x 2, 4 projections, head


def test_schedule_warmup_then_cosine_in_steps():
    cfg = optim.default_config("lars")
    cfg.base_lr, cfg.warmup_steps, cfg.end_lr_factor = 0.3, 10, 0.0
    _, schedule = optim.make_optimizer(cfg, total_steps=110, batch_size=1024)
    peak = 0.3 * 1024 / 256
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, peak / 2, peak], rtol=1e-6)
    # SimCLR: cosine over the steps after warm-up, reaching 0 at total_steps.
    np.testing.assert_allclose(schedule(60), peak * 0.5 * (1 + math.cos(math.pi * 50 / 100)), rtol=1e-6)
    np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)
    cfg.end_lr_factor = 0.1
    _, schedule = optim.make_optimizer(cfg, total_steps=110, batch_size=1024)
    np.testing.assert_allclose(schedule(110), 0.1 * peak, rtol=1e-6)


def test_constant_schedule_and_lr_scalings():
    cfg = optim.default_config("adamw")
    cfg.update(base_lr=1e-5, lr_scaling="none", schedule="constant", warmup_steps=0)
    _, schedule = optim.make_optimizer(cfg, total_steps=100, batch_size=32)
    np.testing.assert_allclose([schedule(0), schedule(99)], [1e-5, 1e-5])
    cfg.warmup_steps = 4
    _, schedule = optim.make_optimizer(cfg, total_steps=100, batch_size=32)
    np.testing.assert_allclose([schedule(2), schedule(4), schedule(50)], [5e-6, 1e-5, 1e-5], rtol=1e-6)
    cfg.update(base_lr=0.075, lr_scaling="sqrt")
    assert optim.scaled_lr(cfg, 4096) == pytest.approx(0.075 * 64)
    cfg.lr_scaling = "linear"
    assert optim.scaled_lr(cfg, 512) == pytest.approx(0.15)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_is_masked_for_adamw_and_sgd(name):
    cfg = optim.default_config(name)
    cfg.update(base_lr=0.5, lr_scaling="none", schedule="constant", weight_decay=0.1, momentum=0.0)
    tx, _ = optim.make_optimizer(cfg, total_steps=10, batch_size=8)
    params = {"dense": {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.full(2, 2.0, np.float32)}}
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * 0.1 * 2.0, rtol=1e-6)  # decoupled decay
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def swav_larc_reference(params, grads_per_step, lrs, *, weight_decay, eta, momentum, clip, eps=1e-8):
    """NumPy port of apex.parallel.LARC.step around torch.optim.SGD(momentum, weight_decay moved into LARC)."""
    params = {path: w.astype(np.float64) for path, w in params.items()}
    buf = {path: None for path in params}
    for grads, lr in zip(grads_per_step, lrs):
        for path, w in params.items():
            g = grads[path].astype(np.float64)
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            if w_norm != 0 and g_norm != 0:
                ratio = eta * w_norm / (g_norm + w_norm * weight_decay + eps)
                if clip:
                    ratio = min(ratio / lr, 1.0) if lr > 0 else 1.0  # torch: tensor / 0 = inf
                g = (g + weight_decay * w) * ratio
            buf[path] = g if buf[path] is None else momentum * buf[path] + g  # torch SGD, dampening 0
            params[path] = w - lr * buf[path]
    return params


@pytest.mark.parametrize("clip", [False, True])
def test_larc_matches_swav_apex_update(clip):
    cfg = optim.default_config("larc")
    cfg.update(base_lr=0.6, lr_scaling="none", warmup_steps=2, weight_decay=1e-2, larc_clip=clip)
    tx, schedule = optim.make_optimizer(cfg, total_steps=6, batch_size=256)
    params = _tiny_params()
    params["zero"] = {"kernel": np.zeros((2, 2), np.float32)}  # norm 0: passes unchanged, as in apex
    rng = np.random.default_rng(2)
    grads_per_step = [jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params) for _ in range(5)]
    state, jax_params = tx.init(params), params
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
    lrs = [float(schedule(step)) for step in range(5)]
    expected = swav_larc_reference(_flat(params), [_flat(g) for g in grads_per_step], lrs, weight_decay=1e-2,
                                   eta=1e-3, momentum=0.9, clip=clip)
    got = _flat(jax_params)
    for path in expected:  # every parameter adapted and decayed, BatchNorm and biases included
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # The warm-up starts at lr 0, where the clipped ratio would divide by zero: min(inf, 1) = 1, as in apex.
    assert np.all(np.isfinite(got["conv/kernel"]))
    lars_cfg = optim.default_config("lars")
    lars_cfg.update(base_lr=0.6, lr_scaling="none", warmup_steps=2, weight_decay=1e-2)
    lars_tx, _ = optim.make_optimizer(lars_cfg, total_steps=6, batch_size=256)
    lars_state, lars_params = lars_tx.init(params), params
    for grads in grads_per_step:
        updates, lars_state = lars_tx.update(grads, lars_state, lars_params)
        lars_params = optax.apply_updates(lars_params, updates)
    assert not np.allclose(_flat(lars_params)["bn/scale"], got["bn/scale"], rtol=1e-4)  # LARS skips BN


def test_config_errors_are_one_clear_line():
    cfg = optim.default_config("lamb")
    with pytest.raises(ValueError, match="name='lamb' is not one of"):
        optim.make_optimizer(cfg, total_steps=10, batch_size=8)
    cfg = optim.default_config()
    cfg.warmup_steps = 20
    with pytest.raises(ValueError, match="warmup_steps=20"):
        optim.make_optimizer(cfg, total_steps=10, batch_size=8)
    del cfg["eta"]
    cfg.warmup_steps = 0
    with pytest.raises(ValueError, match="no field 'eta'"):
        optim.make_optimizer(cfg, total_steps=10, batch_size=8)


def test_lars_gradient_scale_cancels_only_for_adapted_parameters():
    # Why the NT-Xent scale matters under LARS (see losses.contrastive.ntxent): with wd = 0, doubling the
    # loss leaves kernel steps unchanged (trust ratio) but doubles the steps of excluded BN/bias parameters.
    cfg = optim.default_config("lars")
    cfg.update(base_lr=1.0, lr_scaling="none", schedule="constant", weight_decay=0.0)
    tx, _ = optim.make_optimizer(cfg, total_steps=10, batch_size=256)
    params = _tiny_params()
    grads = jax.tree.map(lambda w: np.full_like(w, 0.3), params)
    single, _ = tx.update(grads, tx.init(params), params)
    double, _ = tx.update(jax.tree.map(lambda g: 2 * g, grads), tx.init(params), params)
    np.testing.assert_allclose(double["conv"]["kernel"], single["conv"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(double["bn"]["scale"], 2 * single["bn"]["scale"], rtol=1e-6)
    np.testing.assert_allclose(double["dense"]["bias"], 2 * single["dense"]["bias"], rtol=1e-6)


def test_encoder_update_factors_follow_dinov2_layer_decay_and_freeze_the_encoder_first():
    """make_optimizer with DINOv2's pretraining factors (layerwise_decay 0.9, patch_embed_lr_mult 0.2 in
    ssl_default_config.yaml) and a frozen encoder: SGD updates equal lr * factor * gradient, with
    factor = 0.9 ** (L + 1 - layer id) (x 0.2 for the patch embedding) for a ViT of L = 2 blocks, 1 for the
    head, and 0 for every encoder parameter (weight decay included) during the first 2 updates."""
    params = {"encoder": {"patch_embed": {"kernel": jnp.ones((2, 2))}, "cls_token": jnp.ones((2,)),
                          "block_0": {"kernel": jnp.ones((2, 2))}, "block_1": {"kernel": jnp.ones((2, 2))},
                          "encoder_norm": {"scale": jnp.ones((2,))}},
              "head": {"kernel": jnp.ones((2, 2))}}
    cfg = optim.default_config("sgd")
    optim.add_encoder_update_fields(cfg)
    cfg.update(base_lr=0.5, lr_scaling="none", schedule="constant", momentum=0.0, weight_decay=0.1,
               layer_decay=0.9, patch_embed_lr_mult=0.2, frozen_encoder_steps=2)
    tx, _ = optim.make_optimizer(cfg, total_steps=10, batch_size=256)
    grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), params)
    expected_factor = {"patch_embed": 0.2 * 0.9 ** 3, "cls_token": 0.9 ** 3, "block_0": 0.9 ** 2,
                       "block_1": 0.9, "encoder_norm": 1.0}
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        for name, factor in expected_factor.items():
            decayed = name != "encoder_norm"  # optim.param_labels: no weight decay on norms and biases
            want = 0.0 if step < 2 else -0.5 * factor * (2.0 + (0.1 if decayed else 0.0))
            np.testing.assert_allclose(jax.tree.leaves(updates["encoder"][name])[0], want, rtol=1e-6)
        np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * 2.1, rtol=1e-6)
    cfg.frozen_encoder_steps = 10
    with pytest.raises(ValueError, match="frozen_encoder_steps=10"):
        optim.make_optimizer(cfg, total_steps=10, batch_size=256)
    cfg.update(frozen_encoder_steps=0, layer_decay=1.5)
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        optim.make_optimizer(cfg, total_steps=10, batch_size=256)
