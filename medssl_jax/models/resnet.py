"""ResNet v1 encoder in Flax linen, laid out like SimCLR's (google-research/simclr `resnet.py`).

What follows SimCLR (and so Azizi et al.'s encoders):
- stem: 7x7/2 convolution with 64*width filters, BN+ReLU, 3x3/2 max-pool (SAME);
- stages of 64, 128, 256, 512 base filters times the width multiplier; basic blocks for depth 18/34,
  bottleneck blocks (x4 expansion, stride on the 3x3 convolution) for 50/101/152;
- the first block of every stage has a 1x1 projection shortcut (+BN), also in stage 1 of the basic-block
  nets (SimCLR's `block_group` always passes `use_projection=True`; torchvision omits it there);
- strided convolutions pad explicitly ((k-1)//2 before, the rest after) instead of TF/XLA 'SAME', which
  pads asymmetrically at stride 2 (`conv2d_fixed_padding`);
- convolution kernels from variance scaling (scale 1, fan_in, truncated normal), TF1's default that
  SimCLR uses; no convolution biases;
- BatchNorm decay (Flax momentum) 0.9, epsilon 1e-5; the last BN of every residual branch starts with
  gamma = 0 (`init_zero`), so every block starts as the identity of its shortcut;
- `cifar_stem=True` is SimCLR's stem for small images (its CIFAR-10 runs): a 3x3/1 convolution and no
  max-pool, so a 28 or 32 px image keeps its resolution into stage 1 (the 7x7/2 stem and pool leave 7x7 of a
  28 px image there, 1x1 after stage 4). MedMNIST v2's ResNet-18 (28) baselines use this stem too.
BatchNorm has no `axis_name`: under `jax.jit` over global arrays its statistics are already global
(cross-device), which SimCLR needs.

Naming: every BatchNorm module is called `bn*`, every convolution `conv*`. The optimiser's path rule
(`medssl_jax.optim.param_labels`) relies on the `bn` prefix to keep BN parameters out of weight decay
and LARS adaptation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medssl_jax.models.input_norm import normalize_input

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Blocks per stage and whether the stage uses bottleneck blocks.
STAGE_SIZES = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}

conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _fixed_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    before = (kernel_size - 1) // 2
    after = kernel_size - 1 - before
    return ((before, after), (before, after))


class _ConvBN(nn.Module):
    """Convolution (SimCLR's fixed padding) followed by BatchNorm and an optional ReLU."""

    filters: int
    kernel_size: int
    strides: int = 1
    relu: bool = True
    zero_init_gamma: bool = False
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(
            self.filters,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding=_fixed_padding(self.kernel_size),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            scale_init=nn.initializers.zeros if self.zero_init_gamma else nn.initializers.ones,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


class _Block(nn.Module):
    """The fields every residual block has."""

    filters: int
    strides: int
    use_projection: bool
    zero_init_last_bn: bool = True
    dtype: Any = jnp.bfloat16


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv_bn = functools.partial(_ConvBN, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = conv_bn(self.filters, 1, self.strides, relu=False, name="proj")(x, train=train)
        y = conv_bn(self.filters, 3, self.strides, name="conv_bn1")(x, train=train)
        y = conv_bn(self.filters, 3, 1, relu=False, zero_init_gamma=self.zero_init_last_bn,
                    name="conv_bn2")(y, train=train)
        return nn.relu(y + shortcut)


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand to 4x filters (ResNet-50/101/152)."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv_bn = functools.partial(_ConvBN, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = conv_bn(4 * self.filters, 1, self.strides, relu=False, name="proj")(x, train=train)
        y = conv_bn(self.filters, 1, 1, name="conv_bn1")(x, train=train)
        y = conv_bn(self.filters, 3, self.strides, name="conv_bn2")(y, train=train)
        y = conv_bn(4 * self.filters, 1, 1, relu=False, zero_init_gamma=self.zero_init_last_bn,
                    name="conv_bn3")(y, train=train)
        return nn.relu(y + shortcut)


# Stem max-pool padding conventions.
STEM_POOL_PADDING = {"same": "SAME", "torch": ((1, 1), (1, 1))}


class ResNet(nn.Module):
    """SimCLR-style ResNet v1 encoder without a classifier.

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      width: width multiplier (SimCLR's 1x/2x/4x).
      base_width: filters of the stem and first stage at width 1 (64 in the paper; tiny tests use 8).
      dtype: computation dtype; parameters are always float32.
      zero_init_last_bn: start the last BN gamma of every residual branch at 0.
      stem_pool: 'same' (SimCLR/TF: pads (0, 1) on an even stem output such as 112 at 224 px) or
        'torch' (torchvision: pads (1, 1)); converted torchvision weights use 'torch' to match exactly.
      cifar_stem: a 3x3/1 stem convolution and no max-pool (SimCLR's `cifar_stem`, for images of about
        32 px); the stem then has stride 1 and every stage 4x less stride than below.

    Call: `(features [B, D] float32, out_dict)` for images [B, H, W, C] with any channel count C.
    out_dict holds 'stem' (after the max-pool, stride 4), 'stage1'..'stage4' (strides 4, 8, 16, 32; with
    cifar_stem the stem has stride 1 and the stages 1, 2, 4, 8) and
    'pre_logits' (the globally average-pooled features, same as the first output).
    D = base_width * 8 * width, times 4 for the bottleneck depths (2048 * width for ResNet-50).
    """

    depth: int = 50
    width: int = 1
    base_width: int = 64
    dtype: Any = jnp.bfloat16
    zero_init_last_bn: bool = True
    stem_pool: str = "same"
    cifar_stem: bool = False
    input_mean: tuple = ()  # the input normalisation the weights were trained with (models/input_norm.py)
    input_std: tuple = ()

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth={self.depth} is not one of {sorted(STAGE_SIZES)}")
        if x.ndim != 4:
            raise ValueError(f"ResNet input must be [batch, height, width, channels], got shape {x.shape}")
        stage_sizes, bottleneck = STAGE_SIZES[self.depth]
        block_cls = BottleneckBlock if bottleneck else BasicBlock
        filters = self.base_width * self.width
        out = {}

        x = normalize_input(x, self.input_mean, self.input_std)
        if self.stem_pool not in STEM_POOL_PADDING:
            raise ValueError(f"ResNet stem_pool={self.stem_pool!r} is not one of {sorted(STEM_POOL_PADDING)}")
        if self.cifar_stem:
            x = _ConvBN(filters, 3, 1, dtype=self.dtype, name="stem")(x, train=train)
        else:
            x = _ConvBN(filters, 7, 2, dtype=self.dtype, name="stem")(x, train=train)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=STEM_POOL_PADDING[self.stem_pool])
        out["stem"] = x

        for stage, num_blocks in enumerate(stage_sizes):
            for block in range(num_blocks):
                x = block_cls(
                    filters * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    use_projection=block == 0,
                    zero_init_last_bn=self.zero_init_last_bn,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train=train)
            out[f"stage{stage + 1}"] = x

        # Pool in float32: the features feed the projection head, probes and exports.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["pre_logits"] = features
        return features, out
