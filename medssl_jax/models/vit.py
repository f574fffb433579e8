"""Vision Transformer encoder (Flax linen) that mirrors DINOv2's and timm's ViTs closely enough to load
their weights and reproduce their outputs (see medssl_jax.models.convert).

Architecture (facebookresearch/dinov2 `vision_transformer.py`, timm `VisionTransformer`):
- patch embedding: a conv with kernel = stride = patch size, with bias;
- one CLS token, then optional register tokens (DINOv2 "with registers"), then the patch tokens;
- positions either rotary (DINOv3, `position='rope'`: q and k of the patch tokens rotated by their
  normalised centres, transformers' DINOv3ViTModel) or, the default, learned position embeddings for the
  CLS token and a square grid of image_size // patch_size patches,
  stored at that grid and resampled in-graph to the input's grid on every call
  (`interpolate.interpolate_pos_embed`, PyTorch bicubic; 'dinov2' semantics with the +0.1 scale offset,
  'size' for transformers' Dinov2Model, 'size_aa' for DINOv2's register models). Register tokens carry no position embedding, as in DINOv2;
- pre-norm blocks: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)), LayerNorm eps 1e-6, fused qkv
  with bias, scale 1/sqrt(head_dim), exact (erf) GELU, optional LayerScale (per-channel gamma), optional
  SwiGLU feed-forward (DINOv2 ViT-g), stochastic depth when training;
- final LayerNorm; features = the normed CLS token ('token'), the mean of the normed patch tokens ('gap'),
  or both concatenated ('token+gap', DINOv2's linear-probe features).

Attention runs through `jax.nn.dot_product_attention` (XLA on CPU/TPU; attention='cudnn' selects cuDNN
flash attention on GPU). cuDNN rejects token counts that are not a multiple of 8 (197 for ViT-B/16 + CLS),
so the token sequence can be zero-padded to a multiple (pad_to_multiple) and the padding masked out with
query/key-value sequence lengths; outputs never contain the padding.

Parameters (plain nested dict, kept close to the DINOv2 state_dict so conversion is a renaming):
  patch_embed/{kernel [p, p, C, D], bias}, cls_token [1, 1, D], pos_embed [1, 1 + g*g, D],
  register_tokens [1, R, D] (R > 0), block_{i}/{norm1, attn/qkv, attn/proj, ls1, norm2, mlp/{fc1, fc2} or
  mlp/{w12, w3}, ls2}, norm/{scale, bias}. qkv's kernel is [D, 3D] with q, k, v blocks in that order.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax.models import interpolate
from medssl_jax.models.input_norm import normalize_input

# name -> (width, depth, heads, mlp_dim, ffn). 'g' is DINOv2's ViT-g (1536 wide, SwiGLU), not big_vision's.
VARIANTS = {
    "Ti": (192, 12, 3, 768, "mlp"),
    "S": (384, 12, 6, 1536, "mlp"),
    "B": (768, 12, 12, 3072, "mlp"),
    "L": (1024, 24, 16, 4096, "mlp"),
    "g": (1536, 40, 24, 6144, "swiglu"),
}
POOLS = ("token", "gap", "token+gap")
POSITIONS = ("learned", "rope")  # learned table (DINOv2, timm) or rotary embeddings (DINOv3)
FFNS = ("mlp", "swiglu")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class ViTConfigError(ValueError):
    """A ViT configuration that cannot be built (one-line message)."""


def decode_variant(variant: str) -> dict:
    """'B/14' -> {'width': 768, 'depth': 12, 'num_heads': 12, 'mlp_dim': 3072, 'ffn': 'mlp', 'patch_size': 14}.

    The patch part is optional ('B' leaves patch_size out).
    """
    name, _, patch = str(variant).partition("/")
    if name not in VARIANTS:
        raise ViTConfigError(f"ViT variant {variant!r}: size must be one of {sorted(VARIANTS)}")
    width, depth, heads, mlp_dim, ffn = VARIANTS[name]
    out = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, ffn=ffn)
    if patch:
        if not patch.isdigit() or int(patch) < 1:
            raise ViTConfigError(f"ViT variant {variant!r}: patch size must be a positive integer")
        out["patch_size"] = int(patch)
    return out


def swiglu_hidden_dim(mlp_dim: int) -> int:
    """DINOv2's SwiGLUFFNFused (and transformers' Dinov2SwiGLUFFN) hidden size: 2/3 of mlp_dim, rounded up to 8."""
    return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


def _dense(features, name, dtype, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


def _layer_norm(name, eps, dtype):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


def rope_tables(grid_hw: tuple[int, int], head_dim: int, theta: float, scale=1.0) -> tuple[jax.Array, jax.Array]:
    """DINOv3's 2-D rotary tables (cos, sin) [gh * gw, head_dim], float32: patch centres normalised to
    [-1, 1] per axis, head_dim / 4 frequencies 1 / theta^(4 j / head_dim) per axis (y then x), the angle
    table repeated twice to head_dim, as transformers' DINOv3ViTRopePositionEmbedding at inference.
    `scale` multiplies the coordinates (DINOv3's training-time `rescale_coords` augmentation)."""
    if head_dim % 4:
        raise ViTConfigError(f"ViT RoPE needs a head dimension divisible by 4, got {head_dim}")
    gh, gw = grid_hw
    ys = 2.0 * (jnp.arange(0.5, gh, dtype=jnp.float32) / gh) - 1.0
    xs = 2.0 * (jnp.arange(0.5, gw, dtype=jnp.float32) / gw) - 1.0
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(gh * gw, 2) * scale
    inv_freq = 1.0 / theta ** jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(gh * gw, -1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    """x [B, N, H, hd] rotated by the tables [N, hd] (rotate_half convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


class Attention(nn.Module):
    num_heads: int
    qkv_bias: bool = True
    implementation: str | None = None
    dtype: Any = jnp.float32
    # First token that `rope` rotates (1 + registers): a module field, so it stays a Python int when
    # nn.remat traces the block's arguments.
    rope_start: int = 0

    @nn.compact
    def __call__(self, x, seq_lengths=None, rope=None):
        b, t, d = x.shape
        if d % self.num_heads:
            raise ViTConfigError(f"ViT width {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads
        qkv = _dense(3 * d, "qkv", self.dtype, use_bias=self.qkv_bias)(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.num_heads, head_dim), 3, axis=2)
        if rope is not None:  # (cos, sin) of the patch tokens: prefix tokens and padding stay unrotated
            cos, sin = rope
            start = self.rope_start
            end = start + cos.shape[0]
            cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
            q = q.at[:, start:end].set(_rotate(q[:, start:end], cos, sin))
            k = k.at[:, start:end].set(_rotate(k[:, start:end], cos, sin))
        y = jax.nn.dot_product_attention(
            q, k, v, scale=1.0 / math.sqrt(head_dim), implementation=self.implementation,
            query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths)
        return _dense(d, "proj", self.dtype)(y.reshape(b, t, d))


class Mlp(nn.Module):
    hidden_dim: int
    gelu_approximate: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = _dense(self.hidden_dim, "fc1", self.dtype)(x)
        x = nn.gelu(x, approximate=self.gelu_approximate)
        return _dense(d, "fc2", self.dtype)(x)


class SwiGLU(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x1, x2 = jnp.split(_dense(2 * self.hidden_dim, "w12", self.dtype)(x), 2, axis=-1)
        return _dense(d, "w3", self.dtype)(nn.silu(x1) * x2)


class Block(nn.Module):
    num_heads: int
    mlp_dim: int
    ffn: str = "mlp"
    layerscale_init: float | None = None
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    gelu_approximate: bool = False
    drop_path: float = 0.0
    attention: str | None = None
    dtype: Any = jnp.float32
    rope_start: int = 0

    def _residual(self, x, branch, name, train):
        if self.layerscale_init is not None:
            gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (x.shape[-1],), jnp.float32)
            branch = branch * gamma.astype(branch.dtype)
        if train and self.drop_path > 0.0:
            # Stochastic depth per sample, rescaled so the expectation is unchanged (DINOv2/timm drop_path).
            keep = 1.0 - self.drop_path
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
            branch = branch * mask.astype(branch.dtype) / keep
        return x + branch

    @nn.compact
    def __call__(self, x, seq_lengths=None, train: bool = False, rope=None):
        # train is positional: nn.remat marks it static by position (self is argument 0).
        y = _layer_norm("norm1", self.ln_eps, self.dtype)(x)
        y = Attention(self.num_heads, self.qkv_bias, self.attention, self.dtype, rope_start=self.rope_start,
                      name="attn")(y, seq_lengths, rope)
        x = self._residual(x, y, "ls1", train)
        y = _layer_norm("norm2", self.ln_eps, self.dtype)(x)
        if self.ffn == "swiglu":
            y = SwiGLU(swiglu_hidden_dim(self.mlp_dim), self.dtype, name="mlp")(y)
        else:
            y = Mlp(self.mlp_dim, self.gelu_approximate, self.dtype, name="mlp")(y)
        return self._residual(x, y, "ls2", train)


class ViT(nn.Module):
    """ViT encoder without a classifier head.

    Attributes:
      variant: 'S/14', 'B/16', ... (size and optional patch, see VARIANTS); the fields below override it.
      width, depth, num_heads, mlp_dim, patch_size, ffn: override the variant's values (None keeps them).
      image_size: the square resolution whose patch grid the position embeddings are stored at
        (518 for DINOv2 -> 37x37, 224 for timm B/16 -> 14x14); any input size divisible by the patch works.
      in_chans: input channels of the patch embedding. A 1-channel image given to a 3-channel model is
        replicated to 3 identical channels (what reading a grayscale image as RGB does).
      num_registers: DINOv2 register tokens (0 or 4 in the released models).
      layerscale_init: LayerScale gamma initial value (DINOv2 trains with 1e-5); None = no LayerScale.
      pos_interp: 'dinov2' (scale factor with the +0.1 offset), 'size' (transformers' Dinov2Model, timm),
        'size_aa' (antialiased; DINOv2 register models) or 'none' (input grid must equal the stored one).
      position: 'learned' (a position table, resampled by pos_interp) or 'rope' (DINOv3: 2-D rotary
        embeddings of the patch tokens' normalised centres in every attention, base `rope_theta`; the CLS
        and register tokens are not rotated; no table, so any patch grid works as it is). `rope_rescale`
        (DINOv3 pretrains with 2): in training only, the coordinates are multiplied by one factor drawn
        log-uniformly from [1 / rope_rescale, rope_rescale] per forward pass; None = off.
      pool: 'token' (normed CLS), 'gap' (mean of normed patch tokens) or 'token+gap' (concatenated).
      drop_path_rate: stochastic depth of the last block (linear from 0 over depth; needs a 'dropout' rng).
      attention: jax.nn.dot_product_attention implementation: None (default XLA), 'xla' or 'cudnn'.
      pad_to_multiple: pad the token sequence to a multiple of this (masked); 0 = 8 with cuDNN, else none.
      remat: rematerialise each block in the backward pass (saves activation memory).
      dtype: computation dtype; parameters stay float32 and the pos-embed is resampled in float32.

    Call: `(features [B, D'] float32, out_dict)` for images [B, H, W, C]. out_dict: 'cls' [B, D] and
    'patch_tokens' [B, N, D] (after the final norm), 'register_tokens' [B, R, D] when R > 0, 'blocks'
    (tuple of the residual stream after every block, [B, 1 + R + N, D] each, before the final norm) and
    'pre_logits' (= features).
    """

    variant: str = "B/16"
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    patch_size: int | None = None
    ffn: str | None = None
    image_size: int = 224
    in_chans: int = 3
    num_registers: int = 0
    layerscale_init: float | None = None
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    gelu_approximate: bool = False
    pos_interp: str = "dinov2"
    position: str = "learned"
    rope_theta: float = 100.0
    rope_rescale: float | None = None
    pool: str = "token"
    drop_path_rate: float = 0.0
    attention: str | None = None
    pad_to_multiple: int = 0
    remat: bool = False
    input_mean: tuple = ()  # the input normalisation the weights were trained with (models/input_norm.py)
    input_std: tuple = ()
    dtype: Any = jnp.bfloat16

    def arch(self) -> dict:
        """The resolved architecture: the variant's values with this module's overrides applied."""
        arch = decode_variant(self.variant)
        for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "ffn"):
            if getattr(self, field) is not None:
                arch[field] = getattr(self, field)
        if "patch_size" not in arch:
            raise ViTConfigError(f"ViT variant {self.variant!r} names no patch size and patch_size is not set")
        if arch["ffn"] not in FFNS:
            raise ViTConfigError(f"ViT ffn={arch['ffn']!r} is not one of {FFNS}")
        if self.pool not in POOLS:
            raise ViTConfigError(f"ViT pool={self.pool!r} is not one of {POOLS}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ViTConfigError(f"ViT attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.position not in POSITIONS:
            raise ViTConfigError(f"ViT position={self.position!r} is not one of {POSITIONS}")
        if self.rope_rescale is not None and (self.position != "rope" or not self.rope_rescale >= 1):
            raise ViTConfigError(f"ViT rope_rescale={self.rope_rescale}: needs position='rope' and a value >= 1")
        if self.pos_interp not in interpolate.POS_INTERP_MODES:
            raise ViTConfigError(f"ViT pos_interp={self.pos_interp!r} is not one of {interpolate.POS_INTERP_MODES}")
        if self.image_size < arch["patch_size"]:
            raise ViTConfigError(f"ViT image_size={self.image_size} is smaller than the patch {arch['patch_size']}")
        return arch

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.arch()["patch_size"]

    @nn.compact
    def __call__(self, x, *, train: bool = False, mask=None, mask_token=None):
        """`mask` [B, N] (True = replace that patch's embedding by `mask_token` [D], before positions are
        added: iBOT's masked image modelling; the token is the caller's parameter, so exports keep the
        plain encoder)."""
        arch = self.arch()
        p, d = arch["patch_size"], arch["width"]
        if x.ndim != 4:
            raise ValueError(f"ViT input must be [batch, height, width, channels], got shape {x.shape}")
        b, h, w, c = x.shape
        if h % p or w % p:
            raise ValueError(f"ViT input {h}x{w} is not divisible by the patch size {p}")
        if c != self.in_chans:
            if c == 1:
                x = jnp.broadcast_to(x, (b, h, w, self.in_chans))
            else:
                raise ValueError(f"ViT input has {c} channels, the model takes {self.in_chans} (or 1)")
        x = normalize_input(x, self.input_mean, self.input_std)

        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.lecun_normal(), name="patch_embed")(x.astype(self.dtype))
        gh, gw = h // p, w // p
        x = x.reshape(b, gh * gw, d)
        if mask is not None:
            if mask.shape != (b, gh * gw) or mask_token is None:
                raise ValueError(f"ViT mask {mask.shape} does not fit {b} images of {gh * gw} patches, or no mask_token")
            x = jnp.where(mask[..., None], jnp.reshape(mask_token, (1, 1, d)).astype(x.dtype), x)

        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        rope = None
        if self.position == "rope":  # DINOv3: rotary patch positions in every attention, no table to resample
            scale = 1.0
            if train and self.rope_rescale is not None:  # DINOv3: one log-uniform factor per forward pass
                bound = math.log(self.rope_rescale)
                scale = jnp.exp(jax.random.uniform(self.make_rng("dropout"), (), minval=-bound, maxval=bound))
            rope = rope_tables((gh, gw), d // arch["num_heads"], self.rope_theta, scale)
        else:
            g = self.pos_grid
            pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + g * g, d), jnp.float32)
            pos = interpolate.interpolate_pos_embed(pos, src_grid=(g, g), dst_grid=(gh, gw), num_prefix_tokens=1,
                                                    mode=self.pos_interp, image_hw=(h, w))
            x = x + pos.astype(x.dtype)
        r = self.num_registers
        if r:
            reg = self.param("register_tokens", nn.initializers.normal(1e-6), (1, r, d), jnp.float32)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, r, d)).astype(x.dtype), x[:, 1:]], axis=1)

        tokens = x.shape[1]
        multiple = self.pad_to_multiple or (8 if self.attention == "cudnn" else 1)
        padded = -(-tokens // multiple) * multiple
        seq_lengths = None
        if padded != tokens:
            x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0)))
            seq_lengths = jnp.full((b,), tokens, jnp.int32)

        block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        rates = np.linspace(0.0, self.drop_path_rate, arch["depth"]) if arch["depth"] > 1 else [self.drop_path_rate]
        blocks = []
        for i in range(arch["depth"]):
            x = block_cls(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], ffn=arch["ffn"],
                          layerscale_init=self.layerscale_init, ln_eps=self.ln_eps, qkv_bias=self.qkv_bias,
                          gelu_approximate=self.gelu_approximate, drop_path=float(rates[i]),
                          attention=self.attention, dtype=self.dtype, rope_start=1 + self.num_registers,
                          name=f"block_{i}")(x, seq_lengths, train, rope)
            blocks.append(x[:, :tokens].astype(jnp.float32))

        x = _layer_norm("norm", self.ln_eps, self.dtype)(x[:, :tokens]).astype(jnp.float32)
        out = {"cls": x[:, 0], "patch_tokens": x[:, 1 + r:], "blocks": tuple(blocks)}
        if r:
            out["register_tokens"] = x[:, 1:1 + r]
        if self.pool == "token":
            features = out["cls"]
        elif self.pool == "gap":
            features = jnp.mean(out["patch_tokens"], axis=1)
        else:
            features = jnp.concatenate([out["cls"], jnp.mean(out["patch_tokens"], axis=1)], axis=-1)
        out["pre_logits"] = features
        return features, out
