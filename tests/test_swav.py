"""Tests of methods/swav.py (SwAV and the hybrid): the loss wiring against NumPy references, the queue,
prototype freezing and normalisation, collapse detection, modality intensities, and 1 vs 8 devices.

The tests swap the ResNet for a one-convolution encoder so that they compile in seconds on a shared
CPU; tests/test_swav_resnet.py covers the real encoder.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medssl_jax import augment, config_lib, intensity, losses
from medssl_jax.data import pipeline
from medssl_jax.methods import swav
from medssl_jax.models import heads
from test_clustering import np_distributed_sinkhorn, np_swav_loss

B, GLOBAL, LOCAL, K, DIM = 8, 16, 8, 6, 8


class TinyEncoder(nn.Module):
    """Conv + BN + ReLU + global pooling; returns (features, out_dict) like the real encoders."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        features = jnp.mean(nn.relu(x), axis=(1, 2))
        return features, {"pre_logits": features}


def make_config(method="swav", **swav_fields):
    c = config_lib.pretrain_config()
    c.method = method
    swav.extend_config(c)
    c.batch_size = B
    c.data.image_size = GLOBAL
    c.swav.local_image_size = LOCAL
    c.swav.num_local_crops = 2
    c.swav.num_prototypes = K
    c.head.hidden_dim = 16
    c.head.out_dim = DIM
    c.augment = augment.preset("none")
    c.compute_dtype = "float32"
    c.swav.freeze_prototypes_steps = c.swav.queue_start_steps = 0  # the loop would resolve the epochs
    for key, value in swav_fields.items():
        c.swav[key] = value
    return c


def tiny_model(config):
    num_labels = config.hybrid.num_labels if config.method == "hybrid" and config.hybrid.supervised_weight > 0 else 0
    head = heads.SwAVHead(hidden_dim=config.head.hidden_dim, out_dim=config.head.out_dim, dtype=jnp.float32)
    return swav.SwAVModel(encoder=TinyEncoder(), head=head, num_prototypes=config.swav.num_prototypes,
                          num_labels=num_labels)


def make_batch(seed=0, num_labels=0):
    rng = np.random.default_rng(seed)
    batch = {
        "global": rng.integers(0, 65536, (B, 2, GLOBAL, GLOBAL, 1)).astype(np.uint16),
        "local": rng.integers(0, 65536, (B, 2, LOCAL, LOCAL, 1)).astype(np.uint16),
    }
    if num_labels:
        labels = rng.integers(0, 2, (B, num_labels)).astype(np.float32)
        labels[rng.random(labels.shape) < 0.4] = np.nan
        batch["labels"] = labels
    return {k: jnp.asarray(v) for k, v in batch.items()}


def setup(config, seed=0):
    model = tiny_model(config)
    batch = make_batch(seed, config.hybrid.num_labels if config.method == "hybrid" else 0)
    variables, state = jax.jit(lambda b: swav.init(model, jax.random.PRNGKey(seed), b, config))(batch)
    return model, batch, variables, state


_JITTED = {}


def run_loss(model, config, variables, state, batch, step=0):
    """loss_fn under jit, compiled once per (model, config) of a test."""
    key = (id(model), id(config))
    if key not in _JITTED:
        _JITTED.clear()
        _JITTED[key] = jax.jit(lambda p, bs, s, b, t: swav.loss_fn(
            p, bs, s, b, model=model, rng=jax.random.PRNGKey(7), step=t, config=config))
    return _JITTED[key](variables["params"], variables["batch_stats"], state, batch, jnp.int32(step))


def forward(model, config, variables, batch, rng=jax.random.PRNGKey(7)):
    """The model's scores and embeddings on the same augmented crops loss_fn sees."""
    crops = swav.augmented_crops(batch, rng=rng, config=config)
    return model.apply(variables, crops, train=True, mutable=["batch_stats"])[0]


def test_data_spec_and_init():
    config = make_config(queue_length=21)
    spec = swav.data_spec(config)
    assert spec["sampler"] == "pairs"
    assert [(c["name"], c["num"], c["size"]) for c in spec["crops"]] == [("global", 2, GLOBAL), ("local", 2, LOCAL)]
    assert spec["fields"] == []
    model, _, variables, state = setup(config)
    # Queue rounded down to a multiple of the global batch, one per assignment crop.
    assert state["queue"].shape == (2, 16, DIM)
    kernel = np.asarray(variables["params"]["prototypes"]["kernel"])
    assert kernel.shape == (DIM, K)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)
    hybrid = make_config("hybrid")
    hybrid.hybrid.supervised_weight = 0.5
    hybrid.intensity.modality_aware = True
    hybrid.data.sampler = "micle"
    spec = swav.data_spec(hybrid)
    assert spec["sampler"] == "micle"
    assert spec["fields"] == ["labels", "modality_id", "bits_stored", "intensity_offset"]
    with pytest.raises(ValueError, match="num_labels"):
        swav.build(hybrid)


def test_swav_loss_fn_matches_numpy_reference():
    config = make_config()
    model, batch, variables, state = setup(config)
    loss, (_, new_state, metrics) = run_loss(model, config, variables, state, batch)
    scores, out = forward(model, config, variables, batch)
    assert scores.shape == (B, 4, K) and out["z"].shape == (B, 4, DIM)
    np.testing.assert_allclose(np.linalg.norm(out["z"], axis=-1), 1.0, rtol=1e-5)
    s = np.asarray(scores, np.float64)
    outputs = [s[:, v] for v in range(4)]
    codes = [np_distributed_sinkhorn(outputs[a], 0.05, 3) for a in (0, 1)]
    want = np_swav_loss(outputs, codes, 0.1, (0, 1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["swav_loss"]), want, rtol=1e-5)
    assert new_state == {}
    assert set(metrics) >= {"loss", "swav/top_prototype_fraction", "swav/embedding_std", "swav/code_entropy"}
    assert swav.check_health(jax.device_get(metrics), step=0) is None


def test_queue_fills_then_is_used_like_swav():
    config = make_config(queue_length=16, queue_start_steps=1)
    model, batch, variables, state = setup(config)
    # Before queue_start_steps nothing is stored.
    _, (_, state0, metrics) = run_loss(model, config, variables, state, batch, step=0)
    assert not np.any(np.asarray(state0["queue"]))
    assert float(metrics["swav/queue_used"]) == 0.0
    # Two steps fill the 16 rows (newest first); the queue is used only once its last row is filled.
    _, (_, state1, metrics) = run_loss(model, config, variables, state0, batch, step=1)
    _, out = forward(model, config, variables, batch)
    z = np.asarray(out["z"])
    np.testing.assert_allclose(state1["queue"][:, :B], np.stack([z[:, 0], z[:, 1]]), atol=2e-5)
    assert float(metrics["swav/queue_used"]) == 0.0 and not np.any(np.asarray(state1["queue"][:, B:]))
    batch2 = make_batch(1)
    _, (_, state2, metrics) = run_loss(model, config, variables, state1, batch2, step=2)
    assert float(metrics["swav/queue_used"]) == 0.0  # last row was still empty at this step
    np.testing.assert_allclose(state2["queue"][:, B:], state1["queue"][:, :B], rtol=1e-6)
    loss, (_, state3, metrics) = run_loss(model, config, variables, state2, batch, step=3)
    assert float(metrics["swav/queue_used"]) == 1.0
    # Reference: codes from Sinkhorn over [queue scores; batch scores], last B rows kept.
    scores, _ = forward(model, config, variables, batch)
    s = np.asarray(scores, np.float64)
    kernel = np.asarray(variables["params"]["prototypes"]["kernel"], np.float64)
    queue = np.asarray(state2["queue"], np.float64)
    codes = [np_distributed_sinkhorn(np.concatenate([queue[i] @ kernel, s[:, a]]), 0.05, 3)[-B:]
             for i, a in enumerate((0, 1))]
    want = np_swav_loss([s[:, v] for v in range(4)], codes, 0.1, (0, 1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_prototypes_frozen_then_trained_and_renormalised():
    config = make_config(freeze_prototypes_steps=2)
    model, batch, variables, state = setup(config)

    @jax.jit
    def grads_at(step):
        g = jax.grad(lambda p: swav.loss_fn(p, variables["batch_stats"], state, batch, model=model,
                                            rng=jax.random.PRNGKey(0), step=step, config=config)[0])(variables["params"])
        return swav.process_grads(g, step=step, config=config)

    frozen, free = grads_at(jnp.int32(1)), grads_at(jnp.int32(2))
    assert not np.any(np.asarray(frozen["prototypes"]["kernel"]))
    assert np.any(np.asarray(free["prototypes"]["kernel"]))
    np.testing.assert_array_equal(frozen["head"]["dense2"]["kernel"], free["head"]["dense2"]["kernel"])
    params = jax.tree.map(lambda p, g: p - 0.5 * g, variables["params"], free)
    kernel = np.asarray(params["prototypes"]["kernel"])
    assert not np.allclose(np.linalg.norm(kernel, axis=0), 1.0, atol=1e-4)
    params, _ = swav.after_update(params, state, step=jnp.int32(2), config=config)
    np.testing.assert_allclose(np.linalg.norm(params["prototypes"]["kernel"], axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(params["prototypes"]["kernel"], kernel / np.linalg.norm(kernel, axis=0), rtol=1e-6)


def test_hybrid_adds_contrastive_and_masked_supervised_terms():
    config = make_config("hybrid")
    config.hybrid.contrastive_weight = 0.7
    config.hybrid.supervised_weight = 0.3
    config.hybrid.num_labels = 3
    config.hybrid.pos_weight = (1.0, 2.0, 3.0)
    model, batch, variables, state = setup(config)
    loss, (_, _, metrics) = run_loss(model, config, variables, state, batch)
    _, out = forward(model, config, variables, batch)
    z = out["z"]
    contrastive = losses.ntxent(z1=z[:, 0], z2=z[:, 1], temperature=0.1)
    # NumPy BCE with pos_weight over the present labels of both global crops.
    logits = np.asarray(out["logits"][:, :2], np.float64)
    labels = np.broadcast_to(np.asarray(batch["labels"])[:, None], logits.shape)
    present = ~np.isnan(labels)
    y = np.where(present, labels, 0.0)
    pw = np.array([1.0, 2.0, 3.0])
    log_sig = -np.logaddexp(0, -logits)
    log_sig_neg = -np.logaddexp(0, logits)
    bce = -(pw * y * log_sig + (1 - y) * log_sig_neg)
    supervised = bce[present].mean()
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), float(contrastive), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["supervised_loss"]), supervised, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["labelled_fraction"]), present[:, 0].mean(), rtol=1e-6)
    want = float(metrics["swav_loss"]) + 0.7 * float(contrastive) + 0.3 * supervised
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # Missing labels get no gradient: all-NaN labels give a zero gradient on the classifier.
    unlabelled = {**batch, "labels": jnp.full_like(batch["labels"], jnp.nan)}
    g = jax.jit(jax.grad(lambda p: swav.loss_fn(p, variables["batch_stats"], state, unlabelled, model=model,
                                                rng=jax.random.PRNGKey(0), step=0, config=config)[0]))(variables["params"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    assert not np.any(np.asarray(g["classifier"]["dense"]["kernel"]))
    with pytest.raises(ValueError, match="labels"):
        run_loss(model, config, variables, state, {k: v for k, v in batch.items() if k != "labels"})
    # Labels per global crop ([B, 2, L], e.g. two images of a patient) are used crop by crop.
    per_crop = jnp.stack([batch["labels"], jnp.full_like(batch["labels"], jnp.nan)], axis=1)
    loss_a, fraction_a = swav._supervised_loss(out["logits"][:, :2], {"labels": per_crop}, config)
    only_first = bce[:, 0][present[:, 0]].mean()
    np.testing.assert_allclose(float(loss_a), only_first, rtol=1e-5)
    np.testing.assert_allclose(float(fraction_a), present[:, 0].mean() / 2, rtol=1e-6)


def test_check_health_reports_collapse_and_nonfinite_loss():
    config = make_config()
    model, batch, variables, state = setup(config)
    # Every image identical -> identical embeddings: every code peaks at the same prototype.
    same = {k: jnp.broadcast_to(v[:1, :1], v.shape) for k, v in batch.items()}
    _, (_, _, metrics) = run_loss(model, config, variables, state, same)
    metrics = jax.device_get(metrics)
    assert float(metrics["swav/top_prototype_fraction"]) == 1.0
    message = swav.check_health(metrics, step=123)
    assert message is not None and "step 123" in message and "top_prototype_fraction=1.000" in message
    # All-black crops make every embedding exactly 0 (BN of a constant, zero biases): the gradient must
    # stay finite so that the train loop reaches check_health instead of stopping on a NaN.
    black = {k: jnp.zeros_like(v) for k, v in batch.items()}
    grads = jax.jit(jax.grad(lambda p: swav.loss_fn(p, variables["batch_stats"], state, black, model=model,
                                                    rng=jax.random.PRNGKey(0), step=0, config=config)[0]))(
        variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    bad = {**metrics, "loss": np.float32(np.nan)}
    assert "not finite at step 5" in swav.check_health(bad, step=5)
    # Scores that tie for every prototype: uniform codes, loss ln K, no gradient.
    healthy = {"loss": 3.0, "swav/top_prototype_fraction": 0.2, "swav/embedding_std": 0.5,
               "swav/prototypes_used": 5.0, "swav/samples": 16.0, "swav/code_entropy": 0.5,
               "swav/num_prototypes": float(K)}
    assert swav.check_health(healthy, step=9) is None
    stuck = {**healthy, "loss": math.log(K), "swav/code_entropy": 0.999}
    assert "codes are uniform" in swav.check_health(stuck, step=9)
    flat = {**healthy, "swav/embedding_std": 1e-4}
    assert "same embedding" in swav.check_health(flat, step=9)
    few = {**healthy, "swav/top_prototype_fraction": 1.0, "swav/samples": 4.0}
    assert swav.check_health(few, step=9) is None


def test_modality_intensity():
    bits = jnp.array([12, 12, 16, 16])
    offset = jnp.array([1024.0, 1024.0, 0.0, 0.0])
    modality = jnp.array([intensity.MODALITY_CT, intensity.MODALITY_CT, intensity.MODALITY_MR, intensity.MODALITY_OTHER])
    assert [pipeline.modality_id(m) for m in ("CT", "mr", "DX", "US")] == [1, 2, 0, 0]
    hu = np.linspace(-1024, 3000, 64).reshape(1, 8, 8, 1)
    stored = (hu + 1024) / 4095 * 65535  # the pipeline's full-range rescaling of 12-bit stored values
    rng = np.random.default_rng(0)
    mr = rng.uniform(100, 900, (1, 8, 8, 1)) / 65535 * 65535
    xray = rng.integers(0, 65536, (1, 8, 8, 1))
    x = jnp.asarray(np.concatenate([stored, stored, mr, xray]).round()[:, None], jnp.uint16)  # [4, 1, 8, 8, 1]
    soft = intensity.CT_WINDOWS["soft_tissue"]
    y = intensity.modality_intensity(x, modality_id=modality, bits_stored=bits, intensity_offset=offset,
                                rng=jax.random.PRNGKey(0), ct_windows=(soft,))
    assert y.shape == x.shape and y.dtype == jnp.float32
    hu_back = np.asarray(x[0, 0], np.float64) / 65535 * 4095 - 1024
    np.testing.assert_allclose(y[0, 0], np.clip((hu_back - (40 - 200)) / 400, 0, 1), atol=1e-5)
    m = np.asarray(x[2, 0], np.float64).ravel() / 65535
    lo, hi = np.percentile(m, [1, 99])
    np.testing.assert_allclose(y[2, 0].ravel(), np.clip((m - lo) / (hi - lo), 0, 1), atol=1e-5)
    np.testing.assert_allclose(y[3], np.asarray(x[3], np.float64) / 65535, atol=1e-6)
    # Window presets are sampled per crop: with many crops both presets of a CT sample occur.
    many = jnp.broadcast_to(x[:1], (1, 32, 8, 8, 1))
    y = intensity.modality_intensity(many, modality_id=modality[:1], bits_stored=bits[:1], intensity_offset=offset[:1],
                                rng=jax.random.PRNGKey(1), ct_windows=(soft, intensity.CT_WINDOWS["lung"]))
    distinct = {tuple(np.round(np.asarray(y[0, i]).ravel()[:20], 4)) for i in range(32)}
    assert len(distinct) == 2
    # Per-crop fields ([B, n]) select per crop: crop 0 as CT, crop 1 as X-ray.
    pair = jnp.concatenate([x[:1], x[:1]], axis=1)  # [1, 2, 8, 8, 1]
    y = intensity.modality_intensity(pair, modality_id=jnp.array([[intensity.MODALITY_CT, intensity.MODALITY_OTHER]]),
                                bits_stored=jnp.array([[12, 12]]), intensity_offset=jnp.array([[1024.0, 1024.0]]),
                                rng=jax.random.PRNGKey(0), ct_windows=(soft,))
    np.testing.assert_allclose(y[0, 0], np.clip((hu_back - (40 - 200)) / 400, 0, 1), atol=1e-5)
    np.testing.assert_allclose(y[0, 1], np.asarray(x[0, 0], np.float64) / 65535, atol=1e-6)
    with pytest.raises(ValueError, match="bits_stored"):
        intensity.modality_intensity(x, modality_id=modality, bits_stored=bits[:2], intensity_offset=offset,
                                rng=jax.random.PRNGKey(0))


def test_sharded_loss_equals_single_device():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = make_config(queue_length=16)
    model, batch, variables, state = setup(config)
    state = {"queue": jnp.asarray(np.random.default_rng(3).normal(size=state["queue"].shape), jnp.float32)}
    single = run_loss(model, config, variables, state, batch, step=1)
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put((variables, state), NamedSharding(mesh, P()))
    sharded = run_loss(model, config, replicated[0], replicated[1], sharded_batch, step=1)
    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
