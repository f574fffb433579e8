"""DINO (methods/dino.py, configs/dino.py): the loss against a NumPy port of DINOLoss, the centre over the
global batch on 8 fake devices, EMA and temperature schedules, no gradient into the teacher, the
weight-normalised last layer, gradient clipping/freezing, the collapse check, the weight-decay schedule,
and a tiny run through the real train loop that checkpoints teacher and centre and resumes bitwise."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from helpers import final_state, set_fields
from medssl_jax import checkpoint, config_lib, losses, main, optim, train
from medssl_jax.data import phantoms
from medssl_jax.methods import dino, health
from medssl_jax.models import heads



def load_config(arg=None):
    return config_lib.load_config("dino", arg)


# No blur or solarisation, for the tests about the teacher, the centre and the gradient: the three crop
# groups' blurs would be most of their compile time.
NO_BLUR = {"dino.global1_blur_p": 0.0, "dino.global2_blur_p": 0.0, "dino.local_blur_p": 0.0,
           "dino.global2_solarize_p": 0.0}


def tiny_config(cache_dir="", **overrides):
    """A ViT of one block (width 16, patch 4) on 8 px global / 4 px local crops, K = 16."""
    c = load_config("runlocal,encoder=vit")
    c.data.cache_dir = cache_dir
    c.data.phantom_patients = 64
    c.data.phantom_size = 32
    c.data.image_size = 8
    c.model.update(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, image_size=8)
    c.dino.update(num_local_crops=2, local_image_size=4, num_prototypes=16, hidden_dim=16, bottleneck_dim=8,
                  freeze_last_layer_steps=1, teacher_temp_warmup_steps=4, warmup_teacher_temp=0.04,
                  teacher_temp=0.07)
    c.batch_size = 16
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 2
    c.checkpoint_every = 2
    c.probe.enabled = False
    c.monitor.every = 0  # tests/test_fsdp.py turns it on
    return set_fields(c, overrides)


# ------------------------------------------------------------------------------------------- the loss


def numpy_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """facebookresearch/dino DINOLoss.forward, crops chunked out of [V*B, K] as there, in float64."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    b, v, _ = student.shape
    student_out = [student[:, i] / student_temp for i in range(v)]
    teacher_out = [softmax((teacher[:, i] - center) / teacher_temp) for i in range(teacher.shape[1])]
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for iv, s in enumerate(student_out):
            if iv == iq:
                continue
            log_s = s - s.max(-1, keepdims=True)
            log_s = log_s - np.log(np.exp(log_s).sum(-1, keepdims=True))
            total += np.mean(np.sum(-q * log_s, axis=-1))
            terms += 1
    new_center = 0.9 * center + 0.1 * np.concatenate([teacher[:, i] for i in range(teacher.shape[1])]).mean(0)
    return total / terms, new_center


def test_dino_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(3, 5, 7))
    teacher = rng.normal(size=(3, 2, 7))
    center = 0.3 * rng.normal(size=7)
    targets = dino.teacher_targets(teacher_logits=jnp.asarray(teacher, jnp.float32),
                                   center=jnp.asarray(center, jnp.float32), teacher_temp=0.04)
    loss, stats = dino.dino_loss(student_logits=jnp.asarray(student, jnp.float32), teacher_probs=targets,
                                 student_temp=0.1)
    expected, expected_center = numpy_dino_loss(student, teacher, center, 0.1, 0.04)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["teacher_probs"]).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(dino.updated_center(jnp.asarray(center, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                                   0.9), expected_center, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        dino.dino_loss(student_logits=jnp.zeros((3, 5, 7)), teacher_probs=jnp.zeros((3, 2, 6)), student_temp=0.1)
    with pytest.raises(ValueError, match="do not fit"):
        dino.teacher_targets(teacher_logits=jnp.zeros((3, 2, 6)), center=jnp.zeros(7), teacher_temp=0.04)
    with pytest.raises(ValueError, match="centering='mean'"):
        dino.teacher_targets(teacher_logits=jnp.zeros((3, 2, 7)), center=jnp.zeros(7), teacher_temp=0.04,
                             centering="mean")


def numpy_sinkhorn_knopp_teacher(teacher, teacher_temp, n_iterations=3):
    """facebookresearch/dinov2 SinkhornKnoppTeacher.sinkhorn_knopp_teacher on [B*G, K] rows, float64."""
    q = np.exp(teacher / teacher_temp).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_knopp_teacher_matches_dinov2_reference():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(6, 2, 9)) * 0.1
    targets = dino.teacher_targets(teacher_logits=jnp.asarray(teacher, jnp.float32), center=jnp.full(9, 5.0),
                                   teacher_temp=0.05, centering="sinkhorn_knopp")
    # DINOv2 concatenates the global crops' outputs crop by crop; the equipartition is over all B*G rows.
    expected = numpy_sinkhorn_knopp_teacher(teacher.reshape(12, 9), 0.05).reshape(6, 2, 9)
    np.testing.assert_allclose(np.asarray(targets), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------- model pieces


@pytest.fixture(scope="module")
def tiny_setup():
    config = tiny_config(**NO_BLUR)
    model = dino.build(config)
    rng = np.random.default_rng(1)
    batch = {
        "global": rng.integers(0, 65535, size=(16, 2, 8, 8, 1)).astype(np.uint16),
        "local": rng.integers(0, 65535, size=(16, 2, 4, 4, 1)).astype(np.uint16),
    }
    variables, state = jax.jit(lambda b: dino.init(model, jax.random.PRNGKey(0), b, config))(batch)
    return config, model, batch, variables, state


def test_init_teacher_is_a_copy_and_center_is_zero(tiny_setup):
    config, _, _, variables, state = tiny_setup
    assert set(variables) == {"params"} and set(variables["params"]) == {"encoder", "head"}
    for s, t in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state["teacher"])):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(t))
    assert state["center"].shape == (config.dino.num_prototypes,) and not np.any(np.asarray(state["center"]))
    # The export is the teacher's backbone.
    exported = dino.export_variables(variables, state)
    assert exported["params"] is state["teacher"]["encoder"]


def test_weight_normalised_last_layer():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    layer = heads.WeightNormDense(5)
    variables = layer.init(jax.random.PRNGKey(1), x)
    assert set(variables["params"]) == {"kernel"}  # g is fixed to 1, not a parameter
    v = np.asarray(variables["params"]["kernel"])
    out = layer.apply(variables, x)
    np.testing.assert_allclose(out, np.asarray(x) @ (v / np.linalg.norm(v, axis=0)), rtol=1e-5, atol=1e-6)
    # Rescaling v changes nothing (only its direction matters); a unit input gives cosine similarities.
    np.testing.assert_allclose(layer.apply({"params": {"kernel": 7.0 * v}}, x), out, rtol=1e-5, atol=1e-6)
    unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    assert float(jnp.max(jnp.abs(layer.apply(variables, unit)))) <= 1.0 + 1e-6
    free = heads.WeightNormDense(5, fixed_scale=False).init(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(free["params"]["scale"], 1.0)


def test_schedules_by_step():
    config = tiny_config(total_steps=100)
    config.dino.update(momentum_teacher=0.996, teacher_temp_warmup_steps=10, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       teacher_temp_epoch_steps=1)
    np.testing.assert_allclose(float(dino.teacher_momentum(0, config)), 0.996, rtol=1e-7)
    np.testing.assert_allclose(float(dino.teacher_momentum(50, config)), 0.998, rtol=1e-7)
    np.testing.assert_allclose(float(dino.teacher_momentum(100, config)), 1.0, rtol=1e-7)
    # main_dino.py's schedule: np.linspace over the warm-up epochs, then teacher_temp (here 1 step = 1 epoch).
    official = np.concatenate([np.linspace(0.04, 0.07, 10), np.full(90, 0.07)])
    got = [float(dino.teacher_temperature(step, config)) for step in range(100)]
    np.testing.assert_allclose(got, official, rtol=1e-6)
    assert got[9] == pytest.approx(0.07)  # one step before a plain linear ramp would get there
    config.dino.teacher_temp_epoch_steps = 4  # per epoch of 4 steps: 10 warm-up steps = 3 epochs (rounded up)
    per_epoch = np.repeat(np.concatenate([np.linspace(0.04, 0.07, 3), np.full(22, 0.07)]), 4)
    np.testing.assert_allclose([float(dino.teacher_temperature(s, config)) for s in range(100)], per_epoch, rtol=1e-6)
    config.dino.update(teacher_temp_warmup_steps=4)  # one warm-up epoch: np.linspace(a, b, 1) == [a]
    assert [round(float(dino.teacher_temperature(s, config)), 6) for s in (0, 3, 4)] == [0.04, 0.04, 0.07]


def test_ema_update(tiny_setup):
    config = tiny_config(total_steps=100, **{"dino.momentum_teacher": 0.996})
    _, _, _, variables, state = tiny_setup
    student = jax.tree.map(lambda p: p + 1.0, variables["params"])
    params, new_state = dino.after_update(student, state, step=50, config=config)
    assert params is student
    m = 0.998  # cosine 0.996 -> 1 at half way
    for t_new, t_old, s in zip(jax.tree.leaves(new_state["teacher"]), jax.tree.leaves(state["teacher"]),
                               jax.tree.leaves(student)):
        np.testing.assert_allclose(t_new, m * np.asarray(t_old) + (1 - m) * np.asarray(s), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_state["center"], state["center"])


def _loss(config, model, params, state, batch, step):
    return dino.loss_fn(params, {}, state, batch, model=model, rng=jax.random.PRNGKey(3), step=jnp.int32(step),
                        config=config)


def test_teacher_gets_no_gradient(tiny_setup):
    config, model, batch, variables, state = tiny_setup
    params = variables["params"]
    # An EMA teacher that differs from the student.
    state = {**state, "teacher": jax.tree.map(lambda p: p * 0.9, params)}
    grad_state = jax.jit(jax.grad(lambda s: _loss(config, model, params, s, batch, 5)[0]))(state)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad_state))
    # At step 0 the teacher IS the student, still without a gradient path through it: the gradient
    # equals the one with the same values as a separate constant teacher.
    same = {**state, "teacher": jax.tree.map(jnp.copy, params)}
    config_flat = tiny_config(**NO_BLUR)  # no temperature warm-up, so steps 0 and 1 differ only in the teacher sync
    config_flat.dino.teacher_temp_warmup_steps = 0
    grad_step0 = jax.jit(jax.grad(lambda p: _loss(config_flat, model, p, state, batch, 0)[0]))(params)
    grad_const = jax.jit(jax.grad(lambda p: _loss(config_flat, model, p, same, batch, 1)[0]))(params)
    for a, b in zip(jax.tree.leaves(grad_step0), jax.tree.leaves(grad_const)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # same math, different fusion
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grad_step0))
    # Step 0 syncs the returned teacher to the student; later steps keep the EMA teacher.
    _, (_, state0, _) = jax.jit(lambda p, s: _loss(config_flat, model, p, s, batch, 0))(params, state)
    _, (_, state5, _) = jax.jit(lambda p, s: _loss(config_flat, model, p, s, batch, 5))(params, state)
    np.testing.assert_array_equal(state0["teacher"]["head"]["last_layer"]["kernel"], params["head"]["last_layer"]["kernel"])
    np.testing.assert_array_equal(state5["teacher"]["head"]["last_layer"]["kernel"], state["teacher"]["head"]["last_layer"]["kernel"])


def test_dinov2_teacher_centring_and_koleo_in_the_loss(tiny_setup):
    """centering=sinkhorn_knopp + koleo_weight (DINOv2's teacher and regulariser): the teacher's targets
    spread the batch evenly over the prototypes, and the loss is DINO's plus the weighted KoLeo term of the
    student's global-crop features."""
    config, model, batch, variables, state = tiny_setup
    dinov2 = tiny_config(**NO_BLUR)
    dinov2.dino.update(centering="sinkhorn_knopp", koleo_weight=0.1)
    loss, (_, _, metrics) = jax.jit(lambda p, s: _loss(dinov2, model, p, s, batch, 5))(variables["params"], state)
    assert np.isfinite(float(loss)) and float(metrics["dino/koleo"]) != 0.0
    assert float(metrics["dino/marginal_entropy"]) > 0.999  # equipartition over the B x 2 teacher outputs
    with pytest.raises(ValueError, match="centering"):
        dinov2.dino.centering = "sinkhorn"
        dino.init(model, jax.random.PRNGKey(0), batch, dinov2)


def test_ibot_patch_loss_and_masked_sinkhorn_match_dinov2_reference():
    """iBOT's term against NumPy ports of DINOv2's code on variable-length lists of masked patches:
    `sinkhorn_knopp_teacher` over the masked patches of the whole batch only, and `forward_masked`
    (per crop the sum over its masked patches / their number, then / the number of crops)."""
    rng = np.random.default_rng(3)
    crops, slots, k, temp = 5, 4, 6, 0.1
    counts = np.array([0, 3, 1, 4, 2])
    valid = np.arange(slots)[None, :] < counts[:, None]
    teacher, student = rng.normal(size=(crops, slots, k)), rng.normal(size=(crops, slots, k))
    # DINOv2 gathers the masked patches into one [n_masked, K] array.
    t_masked = teacher[valid]
    q = np.exp(t_masked / 0.07).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * len(t_masked)
    want_targets = (q * len(t_masked)).T
    got_targets = np.asarray(losses.sinkhorn(scores=teacher.reshape(-1, k), epsilon=0.07, valid=valid.reshape(-1)))
    np.testing.assert_allclose(got_targets.reshape(crops, slots, k)[valid], want_targets, rtol=1e-5, atol=1e-7)
    assert np.all(got_targets.reshape(crops, slots, k)[~valid] == 0)
    s_masked = student[valid]
    log_s = s_masked / temp - np.log(np.exp(s_masked / temp).sum(-1, keepdims=True))
    per_patch = np.sum(want_targets * log_s, axis=-1)
    weights = np.repeat(1.0 / np.maximum(counts, 1), counts)
    want = -np.sum(per_patch * weights) / crops
    got = dino.ibot_loss(student_logits=jnp.asarray(student, jnp.float32), teacher_probs=jnp.asarray(
        got_targets.reshape(crops, slots, k)), valid=jnp.asarray(valid), student_temp=temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_ibot_masks_hold_the_drawn_share_in_fixed_slots():
    mask, index, valid = dino.ibot_masks(jax.random.PRNGKey(0), num_crops=400, num_patches=50, probability=0.5,
                                         ratio=(0.1, 0.5))
    mask, index, valid = np.asarray(mask), np.asarray(index), np.asarray(valid)
    counts = mask.sum(axis=1)
    assert index.shape == valid.shape == (400, 25) and np.array_equal(valid.sum(axis=1), counts)
    assert 0.4 < np.mean(counts > 0) < 0.6 and counts.max() <= 25 and counts[counts > 0].min() >= 5
    for row in range(400):  # the valid slots name exactly the masked patches
        assert set(index[row][valid[row]]) == set(np.flatnonzero(mask[row]))


def test_ibot_trains_the_mask_token_and_needs_a_sinkhorn_vit(tiny_setup):
    config, model, batch, _, _ = tiny_setup
    ibot = tiny_config(**NO_BLUR)
    ibot.dino.update(centering="sinkhorn_knopp", ibot_weight=1.0, ibot_mask_probability=1.0, ibot_mask_ratio=(0.3, 0.5))
    model = dino.build(ibot)
    variables, state = jax.jit(lambda b: dino.init(model, jax.random.PRNGKey(0), b, ibot))(batch)
    assert not np.any(np.asarray(variables["params"]["mask_token"]))  # DINOv2's zeros
    loss_fn = jax.jit(jax.value_and_grad(lambda p: _loss(ibot, model, p, state, batch, 5)[0]))
    loss, grads = loss_fn(variables["params"])
    _, (_, _, metrics) = jax.jit(lambda p: _loss(ibot, model, p, state, batch, 5))(variables["params"])
    assert np.isfinite(float(loss)) and float(metrics["dino/ibot"]) > 0 and float(metrics["dino/ibot_masked_share"]) > 0
    assert np.any(np.asarray(grads["mask_token"]))
    for field, value, message in (("centering", "centering", "sinkhorn_knopp"), ("ibot_mask_ratio", (0.5, 0.2), "low <= high")):
        bad = tiny_config(**NO_BLUR)
        bad.dino.update(centering="sinkhorn_knopp", ibot_weight=1.0)
        bad.dino[field] = value
        with pytest.raises(ValueError, match=message):
            dino.init(dino.build(bad), jax.random.PRNGKey(0), batch, bad)


def test_center_uses_the_global_batch_on_8_devices(tiny_setup):
    config, model, batch, variables, state = tiny_setup
    state = {**state, "center": jnp.linspace(-0.1, 0.1, config.dino.num_prototypes)}
    step = jax.jit(lambda p, s, b: _loss(config, model, p, s, b, 5))
    loss_1, (_, state_1, _) = step(variables["params"], state, batch)
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    params, state_r = jax.device_put((variables["params"], state), NamedSharding(mesh, P()))
    loss_8, (_, state_8, _) = step(params, state_r, sharded)
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
    np.testing.assert_allclose(state_8["center"], state_1["center"], rtol=1e-5, atol=1e-7)
    # And the centre moved by 0.1 x (the batch mean of the teacher outputs - centre), i.e. over all 16 elements.
    teacher_logits, _ = model.apply({"params": state["teacher"]}, dino.augmented_crops(
        batch, rng=jax.random.split(jax.random.PRNGKey(3))[0], config=config)[:1], train=False)
    expected = 0.9 * np.asarray(state["center"]) + 0.1 * np.asarray(teacher_logits).reshape(-1, 16).mean(0)
    np.testing.assert_allclose(state_1["center"], expected, rtol=1e-5, atol=1e-6)


def test_process_grads_clips_each_tensor_and_freezes_the_last_layer(tiny_setup):
    config, _, _, variables, _ = tiny_setup
    grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), variables["params"])
    out = dino.process_grads(grads, step=jnp.int32(0), config=config)  # frozen at step 0 (freeze for 1 step)
    assert not np.any(np.asarray(out["head"]["last_layer"]["kernel"]))
    for g in jax.tree.leaves(out["encoder"]):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(g)), 3.0, rtol=1e-5)  # each tensor to norm 3
    later = dino.process_grads(grads, step=jnp.int32(1), config=config)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(later["head"]["last_layer"]["kernel"])), 3.0, rtol=1e-5)
    small = jax.tree.map(lambda p: jnp.full_like(p, 1e-4), variables["params"])
    kept = dino.process_grads(small, step=jnp.int32(1), config=config)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(small)):
        np.testing.assert_array_equal(a, b)  # below the threshold a gradient is untouched


def test_check_health_flags_a_collapsed_teacher():
    k, b = 16, 16
    student = jax.random.normal(jax.random.PRNGKey(0), (b, 4, k))

    def metrics(teacher, center, student=student):
        targets = dino.teacher_targets(teacher_logits=teacher, center=center, teacher_temp=0.04)
        loss, stats = dino.dino_loss(student_logits=student, teacher_probs=targets, student_temp=0.1)
        m = {"loss": loss, "dino/health_check": jnp.float32(1.0), **health.dino_stats(stats)}
        return jax.device_get(m)

    # Uniform: every teacher output equals the centre, and the student is uniform too.
    same = jnp.broadcast_to(jnp.linspace(-1, 1, k), (b, 2, k))
    message = dino.check_health(metrics(same, same[0, 0], student=jnp.zeros((b, 4, k))), step=300)
    assert message and "uniform" in message and "step 300" in message and "entropy" in message
    # A uniform teacher that the student does not match yet is early DINO, not collapse.
    assert dino.check_health(metrics(same, same[0, 0]), step=300) is None
    # One prototype: prototype 3 dominates for every sample.
    one = jnp.zeros((b, 2, k)).at[:, :, 3].set(1.0)
    message = dino.check_health(metrics(one, jnp.zeros(k)), step=300)
    assert message and "one prototype" in message and "top prototype fraction=1.000" in message
    # Healthy: samples spread over prototypes with sharp teachers.
    spread = jax.nn.one_hot(jnp.arange(b * 2).reshape(b, 2) % k, k)
    assert dino.check_health(metrics(spread, jnp.zeros(k)), step=300) is None
    # Not checked during the first dino.health_check_after_steps steps.
    early = {**metrics(one, jnp.zeros(k)), "dino/health_check": 0.0}
    assert dino.check_health(early, step=10) is None


def test_weight_decay_schedule_in_optim():
    cfg = optim.default_config("adamw")
    cfg.update(base_lr=0.5, lr_scaling="none", schedule="constant", weight_decay=0.04, weight_decay_end=0.4)
    tx, _ = optim.make_optimizer(cfg, total_steps=10, batch_size=8)
    params = {"dense": {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.ones(2, np.float32)}}
    zeros = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    decays = []
    for _ in range(11):
        updates, state = tx.update(zeros, state, params)
        decays.append(float(updates["dense"]["kernel"][0, 0]) / (-0.5 * 2.0))
        assert not np.any(np.asarray(updates["dense"]["bias"]))
    expected = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / 10)) for i in range(11)]
    np.testing.assert_allclose(decays, expected, rtol=1e-5)
    assert optim.make_weight_decay(optim.default_config("adamw"), total_steps=10) == 1e-6  # default: constant


# ------------------------------------------------------------------------------------------- configs


def test_config_file_and_reference_fields():
    full = load_config()
    config_lib.check_known_keys(full, main.reference_config(full))
    assert full.model.name == "vit" and full.model.variant == "S/16" and full.dino.num_prototypes == 65536
    assert [(c["num"], c["size"], c["scale"]) for c in dino.data_spec(full)["crops"]] == [
        (2, 224, (0.4, 1.0)), (8, 96, (0.05, 0.4))]
    assert full.total_steps == 87_500 and full.dino.teacher_temp_warmup_steps == 30 * 875
    assert full.dino.teacher_temp_epoch_steps == 875  # the temperature changes once per epoch, as DINO's
    assert full.optim.name == "adamw" and full.optim.weight_decay_end == 0.4
    local = load_config("runlocal")
    config_lib.check_known_keys(local, main.reference_config(local))
    assert local.compute_dtype == "float32" and local.total_steps <= 600
    # The CPU run is the ResNet-18 with DINOv2's teacher (the tiny ViT does not learn at that size).
    assert local.model.name == "resnet" and local.dino.centering == "sinkhorn_knopp"
    assert load_config("runlocal,encoder=vit").model.name == "vit"
    # DINO's ResNet-50 command (facebookresearch/dino README) at full size; it builds (abstract shapes only).
    rn50 = load_config("encoder=resnet")
    config_lib.check_known_keys(rn50, main.reference_config(rn50))
    assert (rn50.model.name, rn50.model.depth, rn50.model.zero_init_last_bn) == ("resnet", 50, False)
    assert (rn50.optim.name, rn50.optim.base_lr, rn50.optim.weight_decay, rn50.optim.weight_decay_end) == (
        "sgd", 0.03, 1e-4, -1.0)
    assert tuple(rn50.data.crop_scale) == (0.14, 1.0) and tuple(rn50.dino.local_crop_scale) == (0.05, 0.14)
    assert rn50.dino.teacher_temp == 0.04 and rn50.dino.teacher_temp_warmup_steps == 0
    crops = {c["name"]: np.zeros((1, c["num"], c["size"], c["size"], 1), np.uint16) for c in dino.data_spec(rn50)["crops"]}
    variables, _ = jax.eval_shape(lambda: dino.init(dino.build(rn50), jax.random.PRNGKey(0), crops, rn50))
    assert "batch_stats" in variables and variables["params"]["head"]["last_layer"]["kernel"].shape == (256, 65536)
    assert load_config("variant=B/16,steps_per_epoch=100").total_steps == 10_000
    with pytest.raises(ValueError, match="not one of"):
        load_config("runlocal,variant_typo=1")
    bad = tiny_config(total_steps=-1)
    with pytest.raises(ValueError, match="total_steps"):
        dino.init(dino.build(bad), jax.random.PRNGKey(0), {"global": np.zeros((1, 2, 8, 8, 1), np.uint16),
                                                           "local": np.zeros((1, 2, 4, 4, 1), np.uint16)}, bad)


# ------------------------------------------------------------------------------------------- the train loop


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


def test_pretrain_checkpoints_teacher_and_center_and_resumes_bitwise(phantom_cache, tmp_path):
    config = tiny_config(phantom_cache, total_steps=3, checkpoint_every=1)
    straight = str(tmp_path / "straight")
    result = train.pretrain(config, straight)
    assert result.steps_done == 3 and result.export_dir
    interrupted = str(tmp_path / "interrupted")
    assert train.pretrain(config, interrupted, stop_after=1).steps_done == 1
    assert train.pretrain(config, interrupted).steps_done == 3
    step_a, a = final_state(straight)
    step_b, b = final_state(interrupted)
    assert step_a == step_b == 3
    assert set(a["method_state"]) == {"teacher", "center"}
    assert np.any(np.asarray(a["method_state"]["center"]))
    # The teacher followed the student but is not equal to it (EMA).
    teacher = np.asarray(a["method_state"]["teacher"]["head"]["mlp_0"]["kernel"])
    student = np.asarray(a["params"]["head"]["mlp_0"]["kernel"])
    assert not np.array_equal(teacher, student)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The export is the teacher's backbone (DINO evaluates the teacher), not the student's.
    exported, _ = checkpoint.load_export(result.export_dir)
    teacher_leaves = jax.tree.leaves(a["method_state"]["teacher"]["encoder"])
    exported_leaves = jax.tree.leaves(exported["params"])
    assert len(teacher_leaves) == len(exported_leaves)
    for x, y in zip(teacher_leaves, exported_leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dino_with_a_batchnorm_resnet_keeps_and_exports_the_teachers_own_statistics(phantom_cache, tmp_path):
    # DINO's code trains ResNets too: the teacher runs in training mode (batch statistics) and keeps its own
    # running statistics, which are exported with the teacher's weights. They live in method_state, which
    # test_pretrain_checkpoints_teacher_and_center_and_resumes_bitwise already shows resuming bitwise, so
    # one run suffices here (the interrupted + resumed pair cost 30 s of ResNet compiles).
    config = load_config("runlocal,encoder=resnet")
    config.data.update(cache_dir=phantom_cache, phantom_patients=64, phantom_size=32, image_size=16)
    config.model.update(base_width=4)
    config.dino.update(local_image_size=8, num_prototypes=16, hidden_dim=16, bottleneck_dim=8)
    config.update(batch_size=16, total_steps=4, log_every=2, checkpoint_every=2)
    config.optim.warmup_steps = 1
    config.probe.enabled = False
    config.monitor.every = 0
    result = train.pretrain(config, str(tmp_path / "run"))
    _, a = final_state(str(tmp_path / "run"))
    teacher_stats = a["method_state"]["teacher_batch_stats"]["encoder"]
    student_stats = a["batch_stats"]["encoder"]
    assert not np.array_equal(teacher_stats["stem"]["bn"]["mean"], student_stats["stem"]["bn"]["mean"])
    exported, export_config = checkpoint.load_export(result.export_dir)
    assert export_config["model"]["name"] == "resnet"
    np.testing.assert_array_equal(exported["batch_stats"]["stem"]["bn"]["mean"], teacher_stats["stem"]["bn"]["mean"])
    np.testing.assert_array_equal(exported["params"]["stem"]["conv"]["kernel"],
                                  a["method_state"]["teacher"]["encoder"]["stem"]["conv"]["kernel"])


def test_use_bn_in_head_gives_the_head_batchnorm_and_the_teacher_its_own_statistics():
    config = tiny_config(**{"dino.use_bn_in_head": True})
    model = dino.build(config)
    batch = {"global": np.zeros((4, 2, 8, 8, 1), np.uint16), "local": np.zeros((4, 2, 4, 4, 1), np.uint16)}
    variables, state = dino.init(model, jax.random.PRNGKey(0), batch, config)
    assert set(variables["batch_stats"]["head"]) == {"bn_0", "bn_1"}
    assert set(state["teacher_batch_stats"]) == {"head"}  # the ViT itself has no BatchNorm
    exported = dino.export_variables(variables, state)
    assert set(exported) == {"params"}
    with pytest.raises(ValueError, match="drop_path_rate"):
        dino.init(dino.build(tiny_config(**{"dino.use_bn_in_head": True, "model.drop_path_rate": 0.1})),
                  jax.random.PRNGKey(0), batch, tiny_config(**{"dino.use_bn_in_head": True,
                                                               "model.drop_path_rate": 0.1}))
