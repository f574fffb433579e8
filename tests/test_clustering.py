"""Tests of losses/clustering.py against NumPy ports of facebookresearch/swav main_swav.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medssl_jax.losses.clustering import sinkhorn, swav_loss


def np_distributed_sinkhorn(out, epsilon, num_iters, world_size=1):
    """main_swav.py distributed_sinkhorn, single process (all_reduce is the identity), float64."""
    q = np.exp(out.astype(np.float64) / epsilon).T  # K x B
    b = q.shape[1] * world_size
    k = q.shape[0]
    q /= np.sum(q)
    for _ in range(num_iters):
        q /= np.sum(q, axis=1, keepdims=True)
        q /= k
        q /= np.sum(q, axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def np_swav_loss(outputs, codes, temperature, crops_for_assign):
    """The loss of main_swav.py train() on per-crop outputs, with precomputed codes per assign crop."""
    num_crops = len(outputs)
    loss = 0.0
    for i, crop_id in enumerate(crops_for_assign):
        q = codes[i]
        subloss = 0.0
        for v in np.delete(np.arange(num_crops), crop_id):
            x = outputs[v].astype(np.float64) / temperature
            x = x - x.max(axis=1, keepdims=True)
            p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
            subloss -= np.mean(np.sum(q * np.log(p), axis=1))
        loss += subloss / (num_crops - 1)
    return loss / len(crops_for_assign)


def _cosine_scores(rng, batch, num_prototypes, dim=16):
    z = rng.normal(size=(batch, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c = rng.normal(size=(num_prototypes, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (z @ c.T).astype(np.float32)


@pytest.mark.parametrize("batch,num_prototypes,num_iters", [(16, 10, 3), (24, 40, 1), (8, 5, 5)])
def test_sinkhorn_matches_swav(batch, num_prototypes, num_iters):
    scores = _cosine_scores(np.random.default_rng(0), batch, num_prototypes)
    want = np_distributed_sinkhorn(scores, 0.05, num_iters)
    got = np.asarray(sinkhorn(scores=jnp.asarray(scores), epsilon=0.05, num_iters=num_iters))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_sinkhorn_sharded_equals_single_device():
    n = len(jax.devices())
    assert n == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Explicit,))
    scores = _cosine_scores(np.random.default_rng(1), 4 * n, 12)
    single = np.asarray(jax.jit(lambda s: sinkhorn(scores=s))(jnp.asarray(scores)))
    sharded_in = jax.device_put(scores, NamedSharding(mesh, P("data", None)))
    sharded = jax.jit(lambda s: sinkhorn(scores=s))(sharded_in)
    assert sharded.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-6, atol=1e-7)
    # The per-device (local) Sinkhorn would differ: the sums must be global.
    local = np.asarray(sinkhorn(scores=jnp.asarray(scores[:4])))
    assert not np.allclose(local, single[:4], atol=1e-4)
    np.testing.assert_allclose(single, np_distributed_sinkhorn(scores, 0.05, 3), rtol=2e-5, atol=1e-6)


def test_sinkhorn_bf16_large_scores_finite():
    rng = np.random.default_rng(2)
    # scores/eps up to ~300: exp overflows float32 (and bf16) in the direct form, not float64.
    scores = jnp.asarray(rng.normal(size=(32, 20)) * 2.0, dtype=jnp.bfloat16)
    codes = sinkhorn(scores=scores, epsilon=0.02)
    assert codes.dtype == jnp.float32
    s = np.asarray(scores.astype(jnp.float32))
    with np.errstate(over="ignore"):
        assert not np.all(np.isfinite(np.exp(s / 0.02).astype(np.float32)))
    want = np_distributed_sinkhorn(s, 0.02, 3)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(np.asarray(codes), want, rtol=1e-4, atol=1e-6)
    # Extreme: a spread of ~30000 in the exponent underflows whole rows even in float64.
    extreme = jnp.asarray(rng.normal(size=(32, 20)) * 100.0, dtype=jnp.bfloat16)
    codes = np.asarray(jax.jit(lambda x: sinkhorn(scores=x, epsilon=0.01))(extreme))
    assert np.all(np.isfinite(codes))
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)


def test_sinkhorn_no_gradient_and_bad_input():
    scores = jnp.asarray(_cosine_scores(np.random.default_rng(3), 8, 4))
    grad = jax.grad(lambda s: jnp.sum(sinkhorn(scores=s) * s))(scores)
    # Only the explicit `* s` term contributes: d/ds sum(q * s) with q constant is q.
    np.testing.assert_allclose(grad, sinkhorn(scores=scores), rtol=1e-6)
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn(scores=jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores=scores, epsilon=0.0)


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (0,), (1, 0)])
def test_swav_loss_matches_swav(crops_for_assign):
    rng = np.random.default_rng(4)
    num_crops, batch, k = 5, 12, 7
    outputs = [_cosine_scores(rng, batch, k) for _ in range(num_crops)]
    codes = [np_distributed_sinkhorn(outputs[c], 0.05, 3) for c in crops_for_assign]
    want = np_swav_loss(outputs, codes, 0.1, crops_for_assign)
    got = swav_loss(scores_per_crop=[jnp.asarray(o) for o in outputs],
                    codes_per_assign_crop=[jnp.asarray(q, jnp.float32) for q in codes],
                    temperature=0.1, crops_for_assign=crops_for_assign)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_swav_loss_gradient_flows_to_scores_only():
    rng = np.random.default_rng(5)
    outputs = [jnp.asarray(_cosine_scores(rng, 6, 4)) for _ in range(3)]

    def f(outs):
        codes = [sinkhorn(scores=outs[c]) for c in (0, 1)]
        return swav_loss(scores_per_crop=outs, codes_per_assign_crop=codes)

    grads = jax.grad(f)(outputs)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in grads)
    # Numeric check of the gradient of crop 2 (not an assignment crop: no stop_gradient subtlety).
    eps = 1e-3
    e = jnp.zeros_like(outputs[2]).at[1, 2].set(eps)
    num = (f([outputs[0], outputs[1], outputs[2] + e]) - f([outputs[0], outputs[1], outputs[2] - e])) / (2 * eps)
    np.testing.assert_allclose(float(grads[2][1, 2]), float(num), rtol=2e-2, atol=1e-4)


def test_swav_loss_bad_input():
    s = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss(scores_per_crop=[s], codes_per_assign_crop=[s], crops_for_assign=(0,))
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav_loss(scores_per_crop=[s, s], codes_per_assign_crop=[s], crops_for_assign=(0, 1))
    with pytest.raises(ValueError, match="one shape"):
        swav_loss(scores_per_crop=[s, jnp.zeros((4, 5))], codes_per_assign_crop=[s, s])
