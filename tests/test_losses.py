"""NT-Xent and the supervised BCE against NumPy references; NT-Xent on 8 sharded devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medssl_jax import losses


def ntxent_reference(z1, z2, temperature):
    """The paper's L written straight from the formula, one anchor at a time, in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        similarities = np.array([z[i] @ z[k] / temperature for k in range(2 * n)])
        denominator = sum(np.exp(similarities[k]) for k in range(2 * n) if k != i)
        total += -np.log(np.exp(similarities[positive]) / denominator)
    return total / (2 * n)


def simclr_official_reference(z1, z2, temperature, hidden_norm=True):
    """NumPy port of google-research/simclr objective.add_contrastive_loss (one replica)."""
    def normalize(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True) if hidden_norm else x

    def softmax_cross_entropy(onehot, logits):
        logits = logits - logits.max(axis=1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -(onehot * log_softmax).sum(axis=1).mean()

    h1, h2 = normalize(z1.astype(np.float64)), normalize(z2.astype(np.float64))
    n = len(h1)
    labels = np.concatenate([np.eye(n), np.zeros((n, n))], axis=1)
    masks = np.eye(n)
    logits_aa = h1 @ h1.T / temperature - masks * 1e9
    logits_bb = h2 @ h2.T / temperature - masks * 1e9
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    loss_a = softmax_cross_entropy(labels, np.concatenate([logits_ab, logits_aa], axis=1))
    loss_b = softmax_cross_entropy(labels, np.concatenate([logits_ba, logits_bb], axis=1))
    return loss_a + loss_b


def _projections(n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(n, d))).astype(np.float32)  # correlated, like two views
    return z1, z2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_ntxent_matches_formula(temperature):
    z1, z2 = _projections()
    loss = losses.ntxent(z1=z1, z2=z2, temperature=temperature)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ntxent_reference(z1, z2, temperature), rtol=2e-6)


def test_ntxent_is_half_of_simclr_official_loss():
    z1, z2 = _projections(seed=1)
    np.testing.assert_allclose(
        2 * losses.ntxent(z1=z1, z2=z2, temperature=0.1), simclr_official_reference(z1, z2, 0.1), rtol=2e-6)


@pytest.mark.parametrize("hidden_norm", [True, False])
def test_ntxent_official_scale_and_hidden_norm_match_add_contrastive_loss(hidden_norm):
    z1, z2 = _projections(seed=2)
    z1, z2 = 0.3 * z1, 0.3 * z2  # unnormalised logits of a moderate size
    got = losses.ntxent(z1=z1, z2=z2, temperature=0.5, hidden_norm=hidden_norm, scale="official")
    np.testing.assert_allclose(got, simclr_official_reference(z1, z2, 0.5, hidden_norm=hidden_norm), rtol=2e-6)
    with pytest.raises(ValueError, match="scale='sum' is not one of"):
        losses.ntxent(z1=z1, z2=z2, temperature=0.5, scale="sum")


def test_ntxent_is_scale_invariant_and_computed_in_float32():
    z1, z2 = _projections(seed=2)
    z1_bf16, z2_bf16 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
    loss = losses.ntxent(z1=z1_bf16, z2=z2_bf16, temperature=0.1)
    assert loss.dtype == jnp.float32
    expected = ntxent_reference(np.asarray(z1_bf16, np.float32), np.asarray(z2_bf16, np.float32), 0.1)
    np.testing.assert_allclose(loss, expected, rtol=2e-6)
    np.testing.assert_allclose(losses.ntxent(z1=3 * z1, z2=0.2 * z2, temperature=0.1),
                               losses.ntxent(z1=z1, z2=z2, temperature=0.1), rtol=1e-6)


def test_ntxent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        losses.ntxent(z1=np.zeros((4, 8)), z2=np.zeros((5, 8)), temperature=0.1)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_ntxent_sharded_over_8_devices_equals_single_device(axis_type):
    assert jax.device_count() == 8
    z1, z2 = _projections(n=32, d=16, seed=3)
    single = jax.jit(lambda a, b: losses.ntxent(z1=a, z2=b, temperature=0.1))(z1, z2)
    single_grad = jax.grad(lambda a: losses.ntxent(z1=a, z2=z2, temperature=0.1))(z1)

    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    a, b = jax.device_put(z1, sharding), jax.device_put(z2, sharding)
    loss_fn = jax.jit(jax.value_and_grad(lambda a, b: losses.ntxent(z1=a, z2=b, temperature=0.1)))
    loss, grad = loss_fn(a, b)
    # Each device holds 4 rows, yet every row's softmax saw all 64 views: same loss and gradient.
    np.testing.assert_allclose(loss, single, rtol=1e-6)
    np.testing.assert_allclose(loss, ntxent_reference(z1, z2, 0.1), rtol=2e-6)
    np.testing.assert_allclose(grad, single_grad, atol=1e-6)
    assert grad.sharding.spec[0] == "data"


def bce_reference(logits, labels, pos_weight, mask):
    total, count = 0.0, 0
    for (i, j), x in np.ndenumerate(logits.astype(np.float64)):
        y = labels[i, j]
        if np.isnan(y) or not mask[i, j]:
            continue
        p = 1 / (1 + np.exp(-x))
        total += -(pos_weight[j] * y * np.log(p) + (1 - y) * np.log(1 - p))
        count += 1
    return total / count


def test_bce_with_pos_weight_matches_reference_with_missing_labels_and_mask():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3, size=(12, 5)).astype(np.float32)
    labels = (rng.random((12, 5)) < 0.3).astype(np.float32)
    labels[rng.random((12, 5)) < 0.2] = np.nan
    mask = rng.random((12, 5)) < 0.8
    pos_weight = np.array([1.0, 2.5, 0.5, 7.0, 3.0], np.float32)
    loss = losses.bce_with_pos_weight(logits=logits, labels=labels, pos_weight=pos_weight, mask=mask)
    np.testing.assert_allclose(loss, bce_reference(logits, labels, pos_weight, mask), rtol=1e-5)
    # Without a mask only the NaN labels are excluded.
    loss = losses.bce_with_pos_weight(logits=logits, labels=labels, pos_weight=pos_weight)
    np.testing.assert_allclose(loss, bce_reference(logits, labels, pos_weight, np.ones_like(mask)), rtol=1e-5)


def test_bce_matches_torch_bce_with_logits_and_is_stable():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=30, size=(8, 3)).astype(np.float32)  # saturated sigmoids
    labels = (rng.random((8, 3)) < 0.5).astype(np.float32)
    pos_weight = np.array([0.3, 1.0, 4.0], np.float32)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight))(
        torch.from_numpy(logits), torch.from_numpy(labels)).item()
    loss = losses.bce_with_pos_weight(logits=logits, labels=labels, pos_weight=pos_weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.isfinite(loss)


def test_bce_all_excluded_is_zero_and_shape_mismatch_is_an_error():
    loss = losses.bce_with_pos_weight(logits=np.ones((2, 2)), labels=np.full((2, 2), np.nan), pos_weight=None)
    assert float(loss) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        losses.bce_with_pos_weight(logits=np.ones((2, 3)), labels=np.ones((2, 2)), pos_weight=None)


def test_pos_weight_from_labels_ignores_missing():
    labels = np.array([[1, 0, 1], [0, np.nan, 1], [0, 1, np.nan], [0, 0, 0], [np.nan, 0, 1]], np.float32)
    # column 0: 4 present, 1 positive -> 3; column 1: 4 present, 1 positive -> 3; column 2: 4 present, 3 pos.
    np.testing.assert_allclose(losses.pos_weight_from_labels(labels), [3.0, 3.0, 1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match=r"column\(s\) \[1\]"):
        losses.pos_weight_from_labels(np.array([[1, 0], [0, np.nan]]))


def test_koleo_matches_dinov2_koleo_loss_value_and_gradient():
    """The value and gradient of facebookresearch/dinov2 KoLeoLoss, written out in torch (F.normalize,
    the -1-diagonal nearest-neighbour search, nn.PairwiseDistance)."""
    torch = pytest.importorskip("torch")
    features = np.random.default_rng(6).normal(size=(12, 5)).astype(np.float32)

    def dinov2_koleo(x):
        x = torch.nn.functional.normalize(x, eps=1e-8, p=2, dim=-1)
        dots = torch.mm(x, x.t())
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        _, nearest = torch.max(dots, dim=1)
        return -torch.log(torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nearest]) + 1e-8).mean()

    x = torch.from_numpy(features.copy()).requires_grad_(True)
    expected = dinov2_koleo(x)
    expected.backward()
    value, grad = jax.value_and_grad(lambda f: losses.koleo(features=f))(jnp.asarray(features))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Spread-out features score lower than clustered ones: the term pushes neighbours apart.
    clustered = features + 20.0 * np.ones((1, 5), np.float32)
    assert float(losses.koleo(features=clustered)) > float(value)
    with pytest.raises(ValueError, match="batch >= 2"):
        losses.koleo(features=jnp.ones((1, 5)))
