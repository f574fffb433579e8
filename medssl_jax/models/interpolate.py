"""PyTorch-exact bicubic resizing in jnp, and DINOv2's position-embedding interpolation.

`jax.image.resize(method='bicubic')` uses Keys' a = -0.5 and antialiases when downscaling, so it does not
reproduce `torch.nn.functional.interpolate(mode='bicubic', align_corners=False, antialias=False)`, the
function DINOv2, timm and transformers use to resample position embeddings. This module rebuilds that
function: for each spatial axis a [out, in] weight matrix is built in NumPy (float64) when the function is
traced, and applied with an einsum, so the result is jit-friendly and differentiable with respect to the
input (the position embeddings are trainable and are resampled on every forward pass).

PyTorch semantics reproduced (aten/src/ATen/native/UpSample.h, `HelperInterpCubic`):
  - source coordinate  src = s * (dst + 0.5) - 0.5 with s = 1 / scale_factor when a scale factor is given,
    else s = in_size / out_size; no clamping of src for cubic;
  - Keys cubic kernel with A = -0.75 on the 4 taps floor(src) - 1 .. floor(src) + 2;
  - taps outside the input are clamped to the border sample (replicate padding);
  - with a scale factor the output size is floor(in_size * scale_factor).

DINOv2 semantics (`interpolate_pos_embed(..., mode='dinov2')`): facebookresearch/dinov2
`vision_transformer.py` at fc49f49 calls
    F.interpolate(pos, scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), mode='bicubic')
with h0, w0 the target patch grid and M the stored grid side. The newer code (b8931f7) writes
    sx = float(w0 + interpolate_offset) / M        (interpolate_offset = 0.1, interpolate_antialias = False)
which is the same number and the same call, so both versions give identical embeddings; we follow that
(offset 0.1, no antialias). Both return the stored embedding untouched, without any resampling, when the
number of patches equals the stored number and the image is square; we do the same (resampling at the
native grid with the 0.1 offset would not be the identity).
The hub's register models (`dinov2_vit*14_reg`) are built with interpolate_offset=0 and
interpolate_antialias=True, i.e. `size=(h0, w0), antialias=True`: `mode='size_aa'` (torch's antialiased
bicubic: Keys a = -0.5, kernel stretched when downsampling, renormalised taps; `bicubic_aa_matrix`).
transformers' Dinov2Model passes `size=(h0, w0)` without antialias (`mode='size'`); its
Dinov2WithRegistersModel passes `size=(h0, w0), antialias=True` (`mode='size_aa'`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic coefficient (OpenCV uses the same; Keys/PIL/jax.image use -0.5).
DINOV2_OFFSET = 0.1  # facebookresearch/dino issue 8: avoids floor() landing one short of the grid.
POS_INTERP_MODES = ("dinov2", "size", "size_aa", "none")


class InterpolateError(ValueError):
    """Bad arguments to a resize (one-line message)."""


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor(src)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] float64 matrix M with resized = M @ signal, for one axis (PyTorch semantics)."""
    if in_size < 1 or out_size < 1:
        raise InterpolateError(f"bicubic_matrix: sizes must be >= 1, got in={in_size} out={out_size}")
    if scale_factor is not None and scale_factor > 0:
        scale = 1.0 / float(scale_factor)
    else:
        scale = in_size / out_size
    src = scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)  # [out, 4]
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    # Clamped taps can coincide at the border: accumulate instead of assigning.
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def bicubic_aa_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] matrix of torch's antialiased bicubic (F.interpolate(..., antialias=True)).

    aten `_compute_weights_aa`: a Keys kernel with a = -0.5 (PIL's, not -0.75), stretched by the scale
    when downsampling, truncated to the input (no border replication) and renormalised to sum to 1.
    """
    if in_size < 1 or out_size < 1:
        raise InterpolateError(f"bicubic_aa_matrix: sizes must be >= 1, got in={in_size} out={out_size}")
    scale = 1.0 / float(scale_factor) if scale_factor is not None and scale_factor > 0 else in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    a = -0.5
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int64 casts in aten truncate toward zero.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.abs((np.arange(xmin, xmax) - center + 0.5) * invscale)
        w = np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                     np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))
        total = w.sum()
        matrix[i, xmin:xmax] = w / total if total != 0.0 else w
    return matrix


def _pair(value, name: str) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise InterpolateError(f"{name} must be a number or a pair, got {value!r}")
        return tuple(value)
    return (value, value)


def resize_bicubic_torch(x: jax.Array, out_hw: Sequence[int] | int | None = None, *,
                         scale_factor: Sequence[float] | float | None = None,
                         antialias: bool = False) -> jax.Array:
    """Resize x [..., H, W, C] like torch's F.interpolate(mode='bicubic', align_corners=False, antialias=...).

    Give exactly one of out_hw (the output size) or scale_factor (as torch: the output size is
    floor(size * factor) and the source coordinates use 1 / factor, not the size ratio).
    """
    if (out_hw is None) == (scale_factor is None):
        raise InterpolateError("resize_bicubic_torch: give exactly one of out_hw or scale_factor")
    if x.ndim < 3:
        raise InterpolateError(f"resize_bicubic_torch: input must be [..., H, W, C], got shape {x.shape}")
    in_h, in_w = x.shape[-3], x.shape[-2]
    if scale_factor is not None:
        sh, sw = (float(s) for s in _pair(scale_factor, "scale_factor"))
        if sh <= 0 or sw <= 0:
            raise InterpolateError(f"resize_bicubic_torch: scale_factor must be > 0, got {scale_factor!r}")
        out_h, out_w = math.floor(in_h * sh), math.floor(in_w * sw)
    else:
        sh = sw = None
        out_h, out_w = (int(s) for s in _pair(out_hw, "out_hw"))
    if out_h < 1 or out_w < 1:
        raise InterpolateError(f"resize_bicubic_torch: output size {(out_h, out_w)} from input {(in_h, in_w)} "
                               "is empty")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    build = bicubic_aa_matrix if antialias else bicubic_matrix
    mh = jnp.asarray(build(in_h, out_h, sh), dtype)
    mw = jnp.asarray(build(in_w, out_w, sw), dtype)
    # HIGHEST: TPUs would otherwise multiply f32 in bf16 passes and lose the 1e-6 agreement.
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", mh, x.astype(dtype), precision=hi)
    return jnp.einsum("pw,...owc->...opc", mw, y, precision=hi)


def interpolate_pos_embed(pos_embed: jax.Array, *, src_grid: Sequence[int], dst_grid: Sequence[int],
                          num_prefix_tokens: int = 1, mode: str = "dinov2",
                          image_hw: Sequence[int] | None = None) -> jax.Array:
    """Resample [1, P + gh*gw, D] position embeddings from src_grid to dst_grid (P prefix tokens kept).

    mode 'dinov2': torch bicubic with scale_factor (dst + 0.1) / src (facebookresearch/dinov2);
    mode 'size': torch bicubic with an output size (transformers' Dinov2Model, timm);
    mode 'size_aa': the same with antialias=True (DINOv2 models with registers: the hub builds them with
      interpolate_offset=0, interpolate_antialias=True; transformers' Dinov2WithRegistersModel likewise);
    mode 'none': the grids must match.
    As in both PyTorch implementations, nothing is resampled when the grids match and the image is square
    (image_hw; a non-square image with a matching grid is still resampled, as they do).
    The result has the dtype of pos_embed; resampling runs in float32 at least (DINOv2 calls .float()).
    """
    if mode not in POS_INTERP_MODES:
        raise InterpolateError(f"pos-embed interpolation mode must be one of {POS_INTERP_MODES}, got {mode!r}")
    src_h, src_w = (int(v) for v in src_grid)
    dst_h, dst_w = (int(v) for v in dst_grid)
    n, dim = pos_embed.shape[-2], pos_embed.shape[-1]
    if pos_embed.ndim != 3 or n != num_prefix_tokens + src_h * src_w:
        raise InterpolateError(f"pos_embed shape {pos_embed.shape} does not hold {num_prefix_tokens} prefix "
                               f"tokens + a {src_h}x{src_w} grid")
    square = image_hw is None or int(image_hw[0]) == int(image_hw[1])
    if (src_h, src_w) == (dst_h, dst_w) and (square or mode == "none"):
        return pos_embed
    if mode == "none":
        raise InterpolateError(f"pos-embed grid {src_h}x{src_w} does not match the input grid {dst_h}x{dst_w} "
                               "and interpolation is off (pos_interp='none')")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    work_dtype = jnp.promote_types(pos_embed.dtype, jnp.float32)
    grid = grid.reshape(1, src_h, src_w, dim).astype(work_dtype)
    if mode == "dinov2":
        grid = resize_bicubic_torch(grid, scale_factor=((dst_h + DINOV2_OFFSET) / src_h,
                                                        (dst_w + DINOV2_OFFSET) / src_w))
        if grid.shape[1:3] != (dst_h, dst_w):
            raise InterpolateError(f"DINOv2 interpolation of a {src_h}x{src_w} grid gave {grid.shape[1:3]}, "
                                   f"not {dst_h}x{dst_w}")
    else:
        grid = resize_bicubic_torch(grid, (dst_h, dst_w), antialias=mode == "size_aa")
    grid = grid.reshape(1, dst_h * dst_w, dim).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)
