"""PyTorch-exact bicubic resize and DINOv2 pos-embed interpolation, checked against torch on CPU."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from medssl_jax.models import interpolate  # noqa: E402


def _torch_resize(x_nhwc: np.ndarray, **kwargs) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    out = F.interpolate(t, mode="bicubic", align_corners=False, antialias=False, **kwargs)
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("in_hw,kwargs", [
    ((7, 5), dict(size=(13, 11))),            # upsample, non-square
    ((13, 9), dict(size=(5, 4))),             # downsample (no antialias, taps clamped)
    ((6, 9), dict(size=(6, 4))),              # one axis unchanged, one down
    ((37, 37), dict(scale_factor=(16.1 / 37, 16.1 / 37))),   # DINOv2 ViT-B/14 at 224 px
    ((5, 8), dict(scale_factor=(2.5, 0.6))),  # scale factor whose 1/s differs from the size ratio
    ((4, 4), dict(scale_factor=(4.1 / 4, 4.1 / 4))),         # native grid + offset: not the identity
])
def test_resize_matches_torch_float64(in_hw, kwargs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *in_hw, 3))
    want = _torch_resize(x, **kwargs)
    with jax.enable_x64(True):
        if "size" in kwargs:
            got = interpolate.resize_bicubic_torch(jnp.asarray(x), kwargs["size"])
        else:
            got = interpolate.resize_bicubic_torch(jnp.asarray(x), scale_factor=kwargs["scale_factor"])
        got = np.asarray(got)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_hw,kwargs", [
    ((37, 37), dict(size=(16, 16))),          # DINOv2-reg ViT-B/14 at 224 px
    ((13, 9), dict(size=(5, 4))),             # strong downsampling, odd ratios
    ((7, 5), dict(size=(13, 11))),            # upsampling: a = -0.5, taps truncated at the border
    ((37, 37), dict(size=(40, 23))),          # one axis up, one down
])
def test_antialiased_resize_matches_torch_float64(in_hw, kwargs):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, *in_hw, 2))
    want = _torch_resize_aa(x, **kwargs)
    with jax.enable_x64(True):
        got = np.asarray(interpolate.resize_bicubic_torch(jnp.asarray(x), kwargs["size"], antialias=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _torch_resize_aa(x_nhwc, **kwargs):
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    out = F.interpolate(t, mode="bicubic", align_corners=False, antialias=True, **kwargs)
    return out.numpy().transpose(0, 2, 3, 1)


def test_resize_float32_and_jit_and_grad():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 9, 12, 4)).astype(np.float32)
    want = _torch_resize(x, size=(20, 7))
    fn = jax.jit(lambda a: interpolate.resize_bicubic_torch(a, (20, 7)))
    got = np.asarray(fn(jnp.asarray(x)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # Differentiable: gradient of a linear map equals torch autograd's.
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    F.interpolate(t, size=(20, 7), mode="bicubic", align_corners=False).square().sum().backward()
    g = jax.grad(lambda a: jnp.sum(interpolate.resize_bicubic_torch(a, (20, 7)) ** 2))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def _dinov2_reference(pos: np.ndarray, h: int, w: int, patch: int) -> np.ndarray:
    """facebookresearch/dinov2 vision_transformer.py interpolate_pos_encoding (b8931f7 form, offset 0.1)."""
    pos_t = torch.from_numpy(pos)
    npatch = (h // patch) * (w // patch)
    n = pos_t.shape[1] - 1
    if npatch == n and w == h:
        return pos
    m = int(math.sqrt(n))
    # dinov2 unpacks `B, nc, w, h = x.shape`, so its "w0" counts rows: sx scales dim 2 of the NCHW tensor.
    w0, h0 = h // patch, w // patch
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    grid = pos_t[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(sx, sy), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (w0, h0)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    return torch.cat([pos_t[:, :1], grid], dim=1).numpy()


@pytest.mark.parametrize("hw", [(224, 224), (112, 168), (518, 518), (518, 504), (700, 560)])
def test_dinov2_pos_embed_semantics(hw):
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(1, 1 + 37 * 37, 8))
    want = _dinov2_reference(pos, *hw, patch=14)
    with jax.enable_x64(True):
        got = np.asarray(interpolate.interpolate_pos_embed(
            jnp.asarray(pos), src_grid=(37, 37), dst_grid=(hw[0] // 14, hw[1] // 14), image_hw=hw))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_size_mode_matches_transformers_semantics():
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(1, 1 + 6 * 6, 5)).astype(np.float32)
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 6, 6, 5).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 9), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    got = interpolate.interpolate_pos_embed(jnp.asarray(pos), src_grid=(6, 6), dst_grid=(4, 9), mode="size")
    np.testing.assert_allclose(np.asarray(got[:, 1:]), want.reshape(1, -1, 5).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[:, :1]), pos[:, :1])


def test_size_aa_mode_matches_dinov2_register_models():
    # dinov2_vit*14_reg: interpolate_offset=0 -> size=(h0, w0), interpolate_antialias=True.
    rng = np.random.default_rng(5)
    pos = rng.normal(size=(1, 1 + 37 * 37, 4))
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 37, 37, 4).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 12), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    with jax.enable_x64(True):
        got = np.asarray(interpolate.interpolate_pos_embed(jnp.asarray(pos), src_grid=(37, 37), dst_grid=(16, 12),
                                                           mode="size_aa"))
    np.testing.assert_allclose(got[:, 1:], want.reshape(1, -1, 4).numpy(), rtol=0, atol=1e-12)


def test_bad_arguments_raise_one_line_errors():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(interpolate.InterpolateError, match="exactly one"):
        interpolate.resize_bicubic_torch(x)
    with pytest.raises(interpolate.InterpolateError, match="prefix"):
        interpolate.interpolate_pos_embed(jnp.zeros((1, 10, 3)), src_grid=(4, 4), dst_grid=(2, 2))
    with pytest.raises(interpolate.InterpolateError, match="interpolation is off"):
        interpolate.interpolate_pos_embed(jnp.zeros((1, 17, 3)), src_grid=(4, 4), dst_grid=(2, 2), mode="none")
