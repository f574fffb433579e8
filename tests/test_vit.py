"""ViT encoder: shapes, named outputs, masked padding, dtype policy, variants (tiny configs, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax.models import vit

TINY = dict(variant="S/14", width=32, depth=2, num_heads=4, mlp_dim=64, image_size=56, dtype=jnp.float32)


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


def test_decode_variant():
    assert vit.decode_variant("B/14") == dict(width=768, depth=12, num_heads=12, mlp_dim=3072, ffn="mlp",
                                              patch_size=14)
    assert vit.decode_variant("g/14")["ffn"] == "swiglu"
    assert "patch_size" not in vit.decode_variant("L")
    assert vit.swiglu_hidden_dim(6144) == 4096  # DINOv2 ViT-g
    with pytest.raises(vit.ViTConfigError, match="size must be one of"):
        vit.decode_variant("H/14")
    with pytest.raises(vit.ViTConfigError, match="patch size"):
        vit.decode_variant("B/x")


@pytest.fixture(scope="module")
def base():
    """One tiny ViT (2 registers, LayerScale, CLS+mean features) initialised once for the tests below."""
    model = vit.ViT(**TINY, num_registers=2, layerscale_init=0.5, pool="token+gap")
    variables = jax.jit(model.init)(jax.random.key(0), _images((1, 56, 56, 3)))
    return model, variables


def test_shapes_and_out_dict_with_registers_and_pos_interpolation(base):
    model, variables = base
    params = variables["params"]
    assert params["pos_embed"].shape == (1, 1 + 4 * 4, 32)
    assert params["register_tokens"].shape == (1, 2, 32)
    assert params["block_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
    assert params["block_1"]["ls2"].shape == (32,)
    x = _images((2, 42, 28, 3))  # 3x2 grid from the stored 4x4 grid: non-square interpolation
    features, out = jax.jit(model.apply)(variables, x)
    assert features.shape == (2, 64) and features.dtype == jnp.float32
    assert set(out) == {"cls", "patch_tokens", "register_tokens", "blocks", "pre_logits"}
    assert out["cls"].shape == (2, 32) and out["patch_tokens"].shape == (2, 6, 32)
    assert out["register_tokens"].shape == (2, 2, 32)
    assert len(out["blocks"]) == 2 and all(b.shape == (2, 1 + 2 + 6, 32) for b in out["blocks"])
    np.testing.assert_allclose(features[:, :32], out["cls"])
    np.testing.assert_allclose(features[:, 32:], out["patch_tokens"].mean(1), rtol=1e-6, atol=1e-6)


def test_padding_to_multiple_of_8_equals_unpadded(base):
    plain, variables = base
    x = _images((3, 28, 42, 3), seed=1)  # 1 + 2 registers + 6 patches = 9 tokens -> padded to 16
    padded = plain.clone(attention="xla", pad_to_multiple=8)
    f1, o1 = jax.jit(plain.apply)(variables, x)
    f2, o2 = jax.jit(padded.apply)(variables, x)
    np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-6)
    for b1, b2 in zip(o1["blocks"], o2["blocks"]):
        assert b1.shape == b2.shape
        np.testing.assert_allclose(b2, b1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o2["patch_tokens"], o1["patch_tokens"], rtol=1e-5, atol=1e-5)
    # Gradients through the masked padding equal the unpadded ones.
    # (A fixed random readout: the plain sum of a LayerNorm output has a ~zero, noise-only gradient.)
    readout = _images((7, 32), seed=9) - 0.5

    def loss(v, model):
        _, out = model.apply(v, x)
        return jnp.sum(out["cls"] * readout[0]) + jnp.sum(out["patch_tokens"] * readout[1:])

    g1 = jax.jit(jax.grad(loss), static_argnums=1)(variables, plain)
    g2 = jax.jit(jax.grad(loss), static_argnums=1)(variables, padded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max()), g1, g2)


def test_native_grid_square_input_uses_stored_pos_embed_unchanged(base):
    model, variables = base
    x = _images((1, 56, 56, 3))
    # Zero weights everywhere except the pos-embed and the final norm: the patch tokens then show the
    # (normed) pos-embed, which must be the stored one at the native 4x4 grid (no +0.1 resampling).
    zeroed = jax.tree.map(jnp.zeros_like, variables)
    zeroed["params"]["pos_embed"] = variables["params"]["pos_embed"]
    zeroed["params"]["norm"] = {"scale": jnp.ones(32), "bias": jnp.zeros(32)}
    _, out = jax.jit(model.apply)(zeroed, x)
    pos = np.asarray(variables["params"]["pos_embed"][0, 1:], np.float64)
    want = (pos - pos.mean(-1, keepdims=True)) / np.sqrt(pos.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out["patch_tokens"][0], want, rtol=1e-4, atol=1e-4)


def test_bf16_compute_keeps_f32_params_and_grayscale_input_replicates(base):
    model, variables = base
    model = model.clone(dtype=jnp.bfloat16)
    gray = _images((2, 28, 28, 1), seed=3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert variables["params"]["patch_embed"]["kernel"].shape == (14, 14, 3, 32)
    apply = jax.jit(model.apply)
    f_gray, _ = apply(variables, gray)
    f_rgb, _ = apply(variables, jnp.repeat(gray, 3, axis=-1))
    assert f_gray.dtype == jnp.float32
    np.testing.assert_array_equal(f_gray, f_rgb)
    f32, _ = jax.jit(model.clone(dtype=jnp.float32).apply)(variables, gray)
    np.testing.assert_allclose(f_gray, f32, rtol=0.1, atol=0.1)


def test_train_with_drop_path_and_remat_gives_finite_grads(base):
    model, variables = base
    model = model.clone(drop_path_rate=0.5, remat=True)
    x = _images((4, 28, 28, 3), seed=4)

    def loss(v, key):
        return jnp.mean(model.apply(v, x, train=True, rngs={"dropout": key})[0] ** 2)

    g = jax.jit(jax.grad(loss))(variables, jax.random.key(5))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    # Stochastic depth is random in training, off in evaluation.
    train_apply = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key})[0])
    assert not np.allclose(train_apply(variables, jax.random.key(6)), train_apply(variables, jax.random.key(7)))
    evaluate = jax.jit(lambda v: model.apply(v, x)[0])
    np.testing.assert_array_equal(evaluate(variables), evaluate(variables))


def test_swiglu_ffn_param_shapes():
    model = vit.ViT(**{**TINY, "ffn": "swiglu", "mlp_dim": 96, "depth": 1})
    variables = jax.eval_shape(model.init, jax.random.key(0), _images((1, 28, 28, 3)))
    mlp = variables["params"]["block_0"]["mlp"]
    assert mlp["w12"]["kernel"].shape == (32, 2 * 64) and mlp["w3"]["kernel"].shape == (64, 32)


def test_bad_inputs_and_configs_raise_one_line_errors():
    x = _images((1, 30, 28, 3))
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        vit.ViT(**TINY).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="has 2 channels"):
        vit.ViT(**TINY).init(jax.random.key(0), _images((1, 28, 28, 2)))
    with pytest.raises(vit.ViTConfigError, match="pool="):
        vit.ViT(**TINY, pool="max").init(jax.random.key(0), _images((1, 28, 28, 3)))
    with pytest.raises(ValueError, match="interpolation is off"):
        jax.eval_shape(vit.ViT(**TINY, pos_interp="none").init, jax.random.key(0), _images((1, 28, 28, 3)))


def test_rope_rescale_augments_training_only():
    """DINOv3's `rescale_coords`: in training one log-uniform factor in [1/2, 2] per forward pass scales the
    RoPE coordinates (another rng, other features); at evaluation the model is the plain RoPE ViT."""
    fields = {**TINY, "image_size": 28, "position": "rope", "num_registers": 2}
    plain, augmented = vit.ViT(**fields), vit.ViT(**fields, rope_rescale=2.0)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    variables = plain.init(jax.random.PRNGKey(0), x)
    run = lambda model, train, seed=0: np.asarray(model.apply(  # noqa: E731
        variables, x, train=train, rngs={"dropout": jax.random.PRNGKey(seed)})[0])
    np.testing.assert_array_equal(run(augmented, False), run(plain, False))
    np.testing.assert_array_equal(run(plain, True), run(plain, False))  # no drop path here
    assert not np.allclose(run(augmented, True, 0), run(plain, True)) and not np.allclose(
        run(augmented, True, 0), run(augmented, True, 1))
    with pytest.raises(vit.ViTConfigError, match="rope_rescale=0.5"):
        vit.ViT(**fields, rope_rescale=0.5).init(jax.random.PRNGKey(0), x)
    with pytest.raises(vit.ViTConfigError, match="needs position='rope'"):
        vit.ViT(**{**fields, "position": "learned"}, rope_rescale=2.0).init(jax.random.PRNGKey(0), x)
