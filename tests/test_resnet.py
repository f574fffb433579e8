"""ResNet encoder, heads and the encoder registry (tiny models; big ones only through jax.eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax.models import LinearClassifier, ProjectionHead, ResNet, build_encoder
from medssl_jax.models.resnet import BasicBlock, BottleneckBlock


def _abstract_param_count(model, channels=3):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, channels)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_resnet50_param_count_matches_torchvision_without_fc():
    # torchvision resnet50: 25,557,032 parameters, of which the fc layer holds 2048*1000+1000.
    assert _abstract_param_count(ResNet(depth=50)) == 25_557_032 - 2_049_000


def test_resnet18_has_simclr_projection_in_stage1():
    # torchvision resnet18 without fc (11,176,512) plus SimCLR's 1x1 projection conv + BN in stage 1.
    assert _abstract_param_count(ResNet(depth=18)) == 11_689_512 - 513_000 + 64 * 64 + 2 * 64


@pytest.mark.parametrize("width,published_millions", [(2, 94), (4, 375)])
def test_wide_resnet50_param_counts_match_simclr_readme(width, published_millions):
    count = _abstract_param_count(ResNet(depth=50, width=width))
    assert abs(count / 1e6 - published_millions) < 1.0


def test_input_channel_count_only_changes_stem():
    assert _abstract_param_count(ResNet(depth=50), 3) - _abstract_param_count(ResNet(depth=50), 1) == 7 * 7 * 2 * 64


@pytest.mark.parametrize("depth,feature_dim,channels", [(18, 64, 1), (50, 256, 3)])
def test_outputs_shapes_and_dtypes(depth, feature_dim, channels):
    model = ResNet(depth=depth, base_width=8)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, channels))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    features, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert features.shape == (2, feature_dim) and features.dtype == jnp.float32
    expansion = 4 if depth == 50 else 1
    expected = {
        "stem": (2, 8, 8, 8),
        "stage1": (2, 8, 8, 8 * expansion),
        "stage2": (2, 4, 4, 16 * expansion),
        "stage3": (2, 2, 2, 32 * expansion),
        "stage4": (2, 1, 1, 64 * expansion),
        "pre_logits": (2, feature_dim),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    assert out["stage4"].dtype == jnp.bfloat16  # bf16 compute ...
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))  # ... f32 params
    np.testing.assert_array_equal(features, out["pre_logits"])
    np.testing.assert_allclose(features, out["stage4"].astype(jnp.float32).mean(axis=(1, 2)), rtol=1e-6)


def test_cifar_stem_keeps_a_small_image_at_full_resolution_into_stage1():
    """SimCLR's small-image stem: a 28 px image reaches stage 1 at 28 x 28 (7 x 7 with the 7x7/2 stem and
    max-pool) and stage 4 at 4 x 4; the stem kernel is 3x3, the rest of the parameters are unchanged."""
    model = ResNet(depth=18, base_width=8, cifar_stem=True)
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    _, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert [out[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == [28, 28, 14, 7, 4]
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 1, 8)
    assert (_abstract_param_count(ResNet(depth=18, base_width=8), 1)
            - _abstract_param_count(ResNet(depth=18, base_width=8, cifar_stem=True), 1) == (7 * 7 - 3 * 3) * 8)


def _init_params(model):
    return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False))()["params"]


def test_zero_init_last_bn_gamma_per_block():
    params = _init_params(ResNet(depth=18, base_width=4))
    blocks = [name for name in params if name.startswith("stage")]
    assert len(blocks) == 2 + 2 + 2 + 2
    for name in blocks:
        np.testing.assert_array_equal(params[name]["conv_bn2"]["bn"]["scale"], 0.0)
        np.testing.assert_array_equal(params[name]["conv_bn1"]["bn"]["scale"], 1.0)
    block = BasicBlock(filters=4, strides=1, use_projection=False, zero_init_last_bn=False)
    params = block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), train=False)["params"]
    np.testing.assert_array_equal(params["conv_bn2"]["bn"]["scale"], 1.0)
    bottleneck = BottleneckBlock(filters=4, strides=2, use_projection=True).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 4)), train=False)["params"]
    np.testing.assert_array_equal(bottleneck["conv_bn3"]["bn"]["scale"], 0.0)
    np.testing.assert_array_equal(bottleneck["proj"]["bn"]["scale"], 1.0)


def test_zero_init_block_is_identity_of_its_shortcut():
    block = BasicBlock(filters=4, strides=1, use_projection=False, dtype=jnp.float32)
    x = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 6, 6, 4)))
    variables = block.init(jax.random.key(0), x, train=False)
    y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_batchnorm_statistics_update_with_momentum_0_9():
    model = ResNet(depth=18, base_width=8, dtype=jnp.float32)
    x = jax.random.uniform(jax.random.key(3), (4, 32, 32, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    (_, _), state = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda module, method: module.name == "conv" and module.parent.name == "stem")
    stem_conv = state["intermediates"]["stem"]["conv"]["__call__"][0]
    running = state["batch_stats"]["stem"]["bn"]
    # Flax momentum 0.9 == TF decay 0.9: new = 0.9 * old (0 / 1) + 0.1 * batch statistic.
    np.testing.assert_allclose(running["mean"], 0.1 * stem_conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(running["var"], 0.9 + 0.1 * stem_conv.var(axis=(0, 1, 2)), rtol=1e-4)
    # Evaluation mode uses the running statistics and changes nothing.
    _, unchanged = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])


def test_projection_head_v1_structure_and_output():
    head = ProjectionHead(version="v1", hidden_dim=32, out_dim=16)
    x = jax.random.normal(jax.random.key(4), (8, 64))
    variables = head.init(jax.random.key(0), x, train=False)
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert shapes == {
        "dense1": {"kernel": (64, 32)},  # no bias: a BN follows
        "bn1": {"scale": (32,), "bias": (32,)},
        "dense2": {"kernel": (32, 16)},
        "bn2": {"scale": (16,)},  # SimCLR: center=False on the output BN
    }
    kernel = np.asarray(variables["params"]["dense1"]["kernel"])
    assert abs(kernel.std() - 0.01) < 0.002
    (z, out), _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
    assert z.shape == (8, 16) and z.dtype == jnp.float32
    assert set(out) == {"hidden1", "projection"}
    # In training mode the output BN standardises each projection dimension over the batch.
    np.testing.assert_allclose(np.asarray(z).mean(axis=0), 0.0, atol=2e-2)


def test_projection_head_v2_has_three_layers_and_defaults_to_input_width():
    head = ProjectionHead(version="v2")
    variables = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((2, 48)), train=False))
    assert variables["params"]["dense2"]["kernel"].shape == (48, 48)
    assert variables["params"]["dense3"]["kernel"].shape == (48, 128)
    with pytest.raises(ValueError, match="version"):
        ProjectionHead(version="v3").init(jax.random.key(0), jnp.zeros((2, 4)), train=False)


def test_linear_classifier():
    head = LinearClassifier(num_classes=5)
    x = jnp.ones((3, 16), jnp.bfloat16)
    variables = head.init(jax.random.key(0), x)
    logits, out = head.apply(variables, x)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(variables["params"]["dense"]["bias"], 0.0)
    np.testing.assert_allclose(logits, np.ones((3, 16)) @ variables["params"]["dense"]["kernel"], rtol=1e-6)
    assert out["logits"] is logits


def test_build_encoder_registry():
    import ml_collections

    cfg = ml_collections.ConfigDict({"name": "resnet", "depth": 18, "width": 2, "base_width": 8, "dtype": "float32"})
    model = build_encoder(cfg)
    assert isinstance(model, ResNet) and model.width == 2 and model.dtype == jnp.float32
    with pytest.raises(ValueError, match="not one of"):
        build_encoder({"name": "densenet"})
    with pytest.raises(ValueError, match="does not take"):
        build_encoder({"name": "resnet", "dpeth": 50})
