"""ConvNeXt (Liu et al. 2022) as DINOv3 releases it: ConvNeXt T/S/B/L distilled from the 7B ViT.

Layout (facebookresearch/dinov3 `models/convnext.py`, transformers' `DINOv3ConvNextModel`):
- stem: Conv 4x4 stride 4, then LayerNorm over channels; before stages 2-4: LayerNorm, Conv 2x2 stride 2;
- block: depthwise Conv 7x7 (padding 3) -> LayerNorm -> Linear 4d -> exact GELU -> Linear d -> x gamma
  (LayerScale) -> drop path -> + input; drop path linear from 0 to `drop_path_rate` over all blocks;
- output: the last feature map's global average as a CLS-like token, concatenated with the spatial
  tokens, one final LayerNorm over all of them (`cls` = DINOv3's x_norm_clstoken, the feature it
  evaluates; `patch_tokens` = x_norm_patchtokens).
All LayerNorms use eps 1e-6. No BatchNorm: the encoder has no `batch_stats`, like the ViT, so every
method trains it through the same loop. Inputs of any size train; sizes that are not multiples of 32
lose the last rows / columns at each stride, as the PyTorch model does.

Call: `(features [B, dims[-1]] float32, out_dict)` with 'cls', 'patch_tokens' [B, h * w, D], 'stage1'..
'stage4' (the feature maps, strides 4 / 8 / 16 / 32) and 'pre_logits' (= 'cls').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax.models.input_norm import normalize_input

# DINOv3's four ConvNeXt sizes (dinov3 `convnext_sizes`; transformers' DINOv3ConvNextConfig presets).
SIZES = {
    "tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
}


def _layer_norm(name, eps, dtype):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvNeXtBlock(nn.Module):
    drop_path: float = 0.0
    layerscale_init: float | None = 1e-6
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        d = x.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32)
        y = nn.Conv(d, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=d, name="dwconv", **dense)(x)
        y = _layer_norm("norm", self.ln_eps, self.dtype)(y)
        y = nn.Dense(4 * d, name="pwconv1", **dense)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(d, name="pwconv2", **dense)(y)
        if self.layerscale_init is not None:
            gamma = self.param("gamma", nn.initializers.constant(self.layerscale_init), (d,), jnp.float32)
            y = y * gamma.astype(y.dtype)
        if train and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
            y = y * mask.astype(y.dtype) / keep
        return x + y


class ConvNeXt(nn.Module):
    """ConvNeXt encoder without a classifier.

    Attributes:
      size: 'tiny', 'small', 'base' or 'large' (DINOv3's), or '' with explicit `depths` and `dims`.
      depths / dims: blocks and channels of the four stages (override `size`; tiny tests use small ones).
      in_chans: input channels of the stem (a 1-channel image given to a 3-channel model is replicated).
      drop_path_rate: stochastic depth of the last block (linear from 0; needs a 'dropout' rng).
      layerscale_init: initial gamma of every block (ConvNeXt's 1e-6); None = no LayerScale.
      ln_eps: every LayerNorm's epsilon.
      input_mean / input_std: the input normalisation the weights were trained with (input_norm.py).
    """

    size: str = "tiny"
    depths: tuple = ()
    dims: tuple = ()
    in_chans: int = 3
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1e-6
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    input_mean: tuple = ()
    input_std: tuple = ()

    def arch(self) -> tuple[tuple, tuple]:
        if self.size and self.size not in SIZES:
            raise ValueError(f"ConvNeXt size={self.size!r} is not one of {sorted(SIZES)} (or '' with depths and dims)")
        depths = tuple(self.depths) or (SIZES[self.size]["depths"] if self.size else ())
        dims = tuple(self.dims) or (SIZES[self.size]["dims"] if self.size else ())
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"ConvNeXt depths={depths} / dims={dims}: need four stages of >= 1 block and channel")
        return depths, dims

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        depths, dims = self.arch()
        if x.ndim != 4:
            raise ValueError(f"ConvNeXt input must be [batch, height, width, channels], got shape {x.shape}")
        b, h, w, c = x.shape
        if h < 32 or w < 32:
            raise ValueError(f"ConvNeXt input {h}x{w} is smaller than its total stride 32")
        if c != self.in_chans:
            if c != 1:
                raise ValueError(f"ConvNeXt input has {c} channels, the model takes {self.in_chans} (or 1)")
            x = jnp.broadcast_to(x, (b, h, w, self.in_chans))
        x = normalize_input(x, self.input_mean, self.input_std).astype(self.dtype)
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, padding="VALID")
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
        out, index = {}, 0
        for stage, (depth, dim) in enumerate(zip(depths, dims)):
            if stage == 0:
                x = nn.Conv(dim, (4, 4), strides=(4, 4), name="stem", **dense)(x)
                x = _layer_norm("stem_norm", self.ln_eps, self.dtype)(x)
            else:
                x = _layer_norm(f"downsample{stage}_norm", self.ln_eps, self.dtype)(x)
                x = nn.Conv(dim, (2, 2), strides=(2, 2), name=f"downsample{stage}", **dense)(x)
            for block in range(depth):
                x = ConvNeXtBlock(drop_path=float(rates[index]), layerscale_init=self.layerscale_init,
                                  ln_eps=self.ln_eps, dtype=self.dtype, name=f"stage{stage + 1}_block{block}")(
                                      x, train=train)
                index += 1
            out[f"stage{stage + 1}"] = x
        tokens = x.reshape(b, -1, dims[-1]).astype(jnp.float32)
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
        tokens = _layer_norm("norm", self.ln_eps, jnp.float32)(tokens)
        out.update(cls=tokens[:, 0], patch_tokens=tokens[:, 1:], pre_logits=tokens[:, 0])
        return out["cls"], out
