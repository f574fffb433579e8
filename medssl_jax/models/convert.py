"""Weight import: checkpoints of other frameworks -> Flax variables of our ViT / ResNet, with a model config.

Formats (FORMATS):
  dinov2              the official facebookresearch/dinov2 hub `.pth` state_dict (`dinov2_vitb14_pretrain.pth`,
                      `..._reg4_pretrain.pth`), read with torch.load(weights_only=True);
  hf-dinov2           a transformers Dinov2Model / Dinov2WithRegistersModel directory (model.safetensors +
                      config.json), read with safetensors (no torch needed);
  dinov3              the official facebookresearch/dinov3 hub ViT `.pth` (`dinov3_vitb16_pretrain_lvd1689m-*.pth`):
                      RoPE, storage (register) tokens, masked key bias, LayerScale, MLP or SwiGLU; or a hub
                      ConvNeXt `.pth` (`dinov3_convnext_tiny_pretrain_lvd1689m-*.pth`) into models.convnext;
  hf-dinov3           a transformers DINOv3ViTModel directory (model.safetensors + config.json): RoPE,
                      registers, LayerScale, plain or gated MLP (ViT-S/16 ... H+/16), read with safetensors;
                      or a DINOv3ConvNextModel directory (model_type dinov3_convnext: ConvNeXt T/S/B/L);
  timm                a timm VisionTransformer or ConvNeXt state_dict (`.safetensors` or `.pth`, or a directory
                      with model.safetensors and the timm.json that `python -m medssl_jax.export` writes);
  timm-npz            the original JAX `.npz` of the augreg / vision_transformer ViTs that timm loads for
                      `vit_base_patch16_224_in21k` (`Transformer/encoderblock_N/...`), read with
                      np.load(allow_pickle=False);
  torchvision-resnet  a torchvision ResNet-50/101/152 `.pth` state_dict into medssl_jax.models.resnet.ResNet
                      (params + batch_stats), read with torch.load(weights_only=True), or a `.safetensors`
                      one / a directory from `python -m medssl_jax.export --format=torchvision` (any depth);
  simclr-tf           a google-research/simclr TensorFlow (TF1 estimator) checkpoint, SimCLR v1 or v2,
                      ResNet-18..152 at width 1-4 without selective kernels (`r50_1x_sk0`, `r152_2x_sk0`,
                      the v1 `ResNet50_4x` zips' model.ckpt-*), into the same ResNet, read with
                      medssl_jax.models.tf_bundle (no TensorFlow needed; every tensor's CRC-32C checked).
No loader unpickles arbitrary objects.

The architecture is inferred from the checkpoint's tensors (width, depth, heads where the layout tells
them, patch, registers, stored pos-embed grid, LayerScale, SwiGLU) unless the caller chooses one
(`arch={'variant': 'B/14', ...}`); either way every parameter of the model built from the resulting config
must come from exactly one checkpoint tensor of the right shape, otherwise ConvertError lists the first
missing, unexpected and mis-shaped keys. Heads, DINOv2's mask_token and BatchNorm counters are ignored.

Position-embedding interpolation follows the source (see medssl_jax.models.interpolate): 'dinov2' (+0.1
offset) for the hub models without registers, 'size_aa' for the hub register models and transformers'
Dinov2WithRegistersModel, 'size' for transformers' Dinov2Model and timm. At the checkpoint's own resolution
none of them resamples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax import sharding
from medssl_jax.models.resnet import STAGE_SIZES

FORMATS = ("dinov2", "dinov3", "hf-dinov2", "hf-dinov3", "timm", "timm-npz", "torchvision-resnet", "simclr-tf")
# The JSON a medssl_jax export to PyTorch (python -m medssl_jax.export) writes beside model.safetensors.
SIDECARS = {"timm": "timm.json", "torchvision-resnet": "torchvision.json"}

# DINOv2 / DINOv3 / ViT widths whose head count is fixed by the released models.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 20, 1536: 24, 4096: 32}  # + DINOv3 H+ and 7B
_LIST_LIMIT = 5


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the one-line message names the file and the problem."""


# ----------------------------------------------------------------------------------------------- reading


def _to_numpy(value, key: str, path: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value)
        return array
    raise ConvertError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A .pth state_dict as float32 NumPy arrays; torch.load(weights_only=True) never runs pickled code."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading .pth files needs PyTorch (pip install torch, the CPU build is enough)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConvertError(f"{path}: not a loadable weights-only PyTorch state_dict (it pickles objects other than "
                           "tensors; refused instead of running its code)") from None
    except Exception as error:  # noqa: BLE001 - torch raises several types; all mean "not a plain state_dict"
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split("\n")[0][:200] or type(error).__name__
        raise ConvertError(f"{path}: not a loadable weights-only PyTorch state_dict ({first})") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a non-empty state_dict")
    state = {str(k): _to_numpy(v, k, path) for k, v in obj.items() if hasattr(v, "detach")}
    return _strip_common_prefix(state, ("module.", "backbone."))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    from safetensors.flax import load_file  # jax arrays: bfloat16 checkpoints load too

    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ConvertError(f"{path}: not a readable safetensors file ({error})") from None
    return {k: _to_numpy(v, k, path) for k, v in tensors.items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as error:
        raise ConvertError(f"{path}: not a readable .npz archive ({error})") from None
    not_arrays = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        # np.load opens any zip file; a PyTorch .pth is one whose members are not .npy arrays.
        hint = " (a PyTorch checkpoint? use --format=dinov2 or torchvision-resnet)" if path.endswith((".pth", ".pt")) else ""
        raise ConvertError(f"{path}: not a .npz of arrays: member {not_arrays[0]!r} is not a .npy array{hint}")
    return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else np.asarray(v)
            for k, v in arrays.items()}


def read_hf_directory(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict, config.json) of a transformers model directory (or its model.safetensors file)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path if os.path.isfile(path) else os.path.join(directory, "model.safetensors")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(weights):
        raise ConvertError(f"{path}: no model.safetensors (save the model with save_pretrained(safe_serialization=True))")
    if not os.path.isfile(config_path):
        raise ConvertError(f"{path}: no config.json beside the weights")
    with open(config_path) as f:
        hf_config = json.load(f)
    return read_safetensors(weights), hf_config


def _strip_common_prefix(state: dict, prefixes) -> dict:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- the mapping

# A source: (checkpoint keys, function of those arrays -> the Flax array).
Source = tuple[tuple[str, ...], Callable[..., np.ndarray]]


def _same(a):
    return a


def _linear_t(a):  # torch Linear weight [out, in] -> Flax Dense kernel [in, out]
    return a.T


def _conv_oihw(a):  # torch Conv2d weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O]
    return a.transpose(2, 3, 1, 0)


def _concat_linear_t(*arrays):
    return np.concatenate(arrays, axis=0).T


def _concat(*arrays):
    return np.concatenate(arrays, axis=0)


def _abstract_variables(model, image_hw, in_chans) -> dict:
    x = jax.ShapeDtypeStruct((1, *image_hw, in_chans), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False))


def _fill(abstract: dict, state: dict, source_of: Callable[[tuple[str, ...]], Source], *,
          ignore: Callable[[str], bool], what: str, adapt: Callable | None = None) -> dict:
    """Builds a tree shaped like `abstract` from `state`; ConvertError lists what does not fit."""
    missing, misshaped, used = [], [], set()
    leaves = []
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    for path, leaf in flat:
        names = sharding.path_names(path)
        keys, fn = source_of(names)
        absent = [k for k in keys if k not in state]
        if absent:
            missing.extend(absent)
            leaves.append(None)
            continue
        used.update(keys)
        array = np.asarray(fn(*(state[k] for k in keys)), np.float32)
        if adapt is not None:
            array = adapt(names, array)
        if array.shape != tuple(leaf.shape):
            misshaped.append(f"{'+'.join(keys)} gives {array.shape}, {'/'.join(names)} needs {tuple(leaf.shape)}")
        leaves.append(array)
    unexpected = [k for k in state if k not in used and not ignore(k)]
    parts = []
    for label, items in (("missing", set(missing)), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        items = sorted(items, key=_natural)
        if items:
            more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
            parts.append(f"{label} {items[:_LIST_LIMIT]}{more}")
    if parts:
        raise ConvertError(f"{what}: " + "; ".join(parts))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _natural(key: str):
    """Sort key that puts blocks.2 before blocks.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _count_indices(state: Mapping, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    if found and found != set(range(len(found))):
        raise ConvertError(f"block indices {sorted(found)} are not consecutive from 0")
    return len(found)


def _grid_side(num_tokens: int, num_prefix: int, what: str) -> int:
    side = math.isqrt(num_tokens - num_prefix)
    if side * side != num_tokens - num_prefix:
        raise ConvertError(f"{what}: {num_tokens} position embeddings are not {num_prefix} + a square grid")
    return side


def _require(state: Mapping, keys, what: str):
    absent = [k for k in keys if k not in state]
    if absent:
        raise ConvertError(f"{what}: not this format, missing {absent[:_LIST_LIMIT]} "
                           f"(first keys present: {sorted(state)[:_LIST_LIMIT]})")


def _vit_config(inferred: dict, arch: Mapping | None) -> dict:
    """Model config for build_encoder: the inferred one, or the caller's choice on top of it."""
    from medssl_jax.models import vit

    config = {"name": "vit", **inferred}
    if arch:
        arch = dict(arch)
        unknown = sorted(set(arch) - set(vit.ViT.__dataclass_fields__) - {"name"})
        if unknown:
            raise ConvertError(f"architecture fields {unknown} are not ViT attributes")
        if "variant" in arch:  # a chosen variant governs the size fields it sets
            for field in vit.decode_variant(arch["variant"]):
                config.pop(field, None)
        config.update(arch)
    return config


def _vit_abstract(config: dict, what: str):
    from medssl_jax import models

    try:
        model = models.build_encoder({**config, "dtype": "float32"})
        side = model.image_size // model.arch()["patch_size"] * model.arch()["patch_size"]
        return _abstract_variables(model, (side, side), model.in_chans)
    except ValueError as error:  # ViTConfigError, InterpolateError, build_encoder's field errors
        raise ConvertError(f"{what}: {error}") from None


def _adapt_in_chans(kernel_names: tuple[str, ...], in_chans: int | None):
    """Summing an RGB first-layer kernel over its input channels gives the same output on grey images that
    are replicated to 3 channels (timm's adapt_input_conv does the same)."""
    def adapt(names, array):
        if in_chans is None or names != kernel_names or array.shape[2] == in_chans:
            return array
        if in_chans == 1:
            return array.sum(axis=2, keepdims=True)
        raise ConvertError(f"cannot adapt a {array.shape[2]}-channel first layer to in_chans={in_chans} (only 1)")
    return adapt


def _describe(config: Mapping, arch) -> str:
    fields = ", ".join(f"{k}={config[k]}" for k in ("variant", "width", "depth", "patch_size") if k in config)
    return f"{config['name']}({fields}, {'as chosen' if arch else 'inferred from the checkpoint'})"


# ------------------------------------------------------------------------------------------------ DINOv2


def dinov2_to_flax(state: dict, *, arch: Mapping | None = None, num_heads: int | None = None,
                   pos_interp: str | None = None, in_chans: int | None = None, what: str = "checkpoint"):
    """Official DINOv2 hub state_dict -> ({'params': ...}, model config)."""
    # Checkpoints saved with block_chunks > 0 name blocks 'blocks.<chunk>.<index>.'.
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    _require(state, ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight"), what)
    width, chans, patch = state["patch_embed.proj.weight"].shape[:3]
    depth = _count_indices(state, r"blocks\.(\d+)\.")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        hidden = state["blocks.0.mlp.w3.weight"].shape[1] if "blocks.0.mlp.w3.weight" in state else 0
        mlp_dim = 4 * width  # DINOv2's ViT-g: SwiGLU hidden = 2/3 of 4 * width, rounded up to 8
    else:
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * width
    heads = num_heads or HEADS_BY_WIDTH.get(int(width))
    if heads is None and not (arch and ("num_heads" in arch or "variant" in arch)):
        raise ConvertError(f"{what}: cannot infer the head count of width {width} (the released widths are "
                           f"{sorted(HEADS_BY_WIDTH)}); give num_heads")
    inferred = dict(
        variant=_variant_name(width, depth, patch), width=int(width), depth=depth, num_heads=heads,
        mlp_dim=int(mlp_dim), patch_size=int(patch), ffn="swiglu" if swiglu else "mlp",
        image_size=_grid_side(state["pos_embed"].shape[1], 1, what) * int(patch), in_chans=int(in_chans or chans),
        num_registers=int(registers), layerscale_init=1.0 if "blocks.0.ls1.gamma" in state else None,
        ln_eps=1e-6, qkv_bias="blocks.0.attn.qkv.bias" in state, gelu_approximate=False,
        pos_interp=pos_interp or ("size_aa" if registers else "dinov2"), pool="token")
    if swiglu and hidden:
        from medssl_jax.models.vit import swiglu_hidden_dim
        if swiglu_hidden_dim(mlp_dim) != hidden:
            raise ConvertError(f"{what}: SwiGLU hidden size {hidden} is not DINOv2's for width {width}")
    config = _vit_config(inferred, arch)
    what = f"{what} does not fit {_describe(config, arch)}"
    abstract = _vit_abstract(config, what)

    params = _fill(abstract["params"], state, dinov2_source, ignore=lambda k: k == "mask_token" or k.startswith("head."),
                   what=what, adapt=_adapt_in_chans(("patch_embed", "kernel"), config.get("in_chans")))
    return {"params": params}, config


def dinov2_source(names: tuple[str, ...]) -> Source:
    """Where a ViT parameter (path under 'params') lives in the DINOv2 hub state_dict, which timm's
    VisionTransformer shares except for `reg_token` (see timm_to_flax)."""
    top = names[0]
    if top == "patch_embed":
        return (f"patch_embed.proj.{'weight' if names[1] == 'kernel' else 'bias'}",), (
            _conv_oihw if names[1] == "kernel" else _same)
    if top in ("cls_token", "pos_embed", "register_tokens"):
        return (top,), _same
    if top == "norm":
        return (f"norm.{'weight' if names[1] == 'scale' else 'bias'}",), _same
    block = f"blocks.{int(top.split('_')[1])}."
    if names[1] in ("ls1", "ls2"):
        return (block + names[1] + ".gamma",), _same
    if names[1] in ("norm1", "norm2"):
        return (block + names[1] + (".weight" if names[2] == "scale" else ".bias"),), _same
    # attn/{qkv,proj}/{kernel,bias}, mlp/{fc1,fc2,w12,w3}/{kernel,bias}
    key = block + ".".join(names[1:-1]) + (".weight" if names[-1] == "kernel" else ".bias")
    return (key,), _linear_t if names[-1] == "kernel" else _same


def _variant_name(width, depth, patch) -> str:
    from medssl_jax.models.vit import VARIANTS

    for name, (w, d, *_rest) in VARIANTS.items():
        if (w, d) == (width, depth):
            return f"{name}/{patch}"
    return f"S/{patch}"  # a non-standard size: the explicit width/depth/heads/mlp_dim fields override S


# ------------------------------------------------------------------------------------- transformers DINOv2


def _hf_block_source(names: tuple[str, ...], layer: str, modules: Mapping[str, str | tuple[str, ...]]) -> Source:
    """A transformer block's parameter (names = block_i/...) in a transformers layout: LayerScale and norms
    are named alike in Dinov2 and DINOv3; `modules` maps our module path ('attn/qkv', 'attn/proj',
    'mlp/fc1', 'mlp/fc2', 'mlp/w12', 'mlp/w3') to its module under `layer`, a tuple for the modules our
    fused one concatenates (q, k, v; SwiGLU's [gate; up])."""
    leaf = "weight" if names[-1] in ("kernel", "scale") else "bias"
    part = names[1]
    if part in ("ls1", "ls2"):
        return (f"{layer}layer_scale{part[-1]}.lambda1",), _same
    if part in ("norm1", "norm2"):
        return (f"{layer}{part}.{leaf}",), _same
    module = modules["/".join(names[1:-1])]
    if isinstance(module, tuple):
        return tuple(f"{layer}{m}.{leaf}" for m in module), _concat_linear_t if names[-1] == "kernel" else _concat
    return (f"{layer}{module}.{leaf}",), _linear_t if names[-1] == "kernel" else _same


_HF_DINOV2_MODULES = {
    "attn/qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attn/proj": "attention.output.dense", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
    "mlp/w12": ("mlp.gate_proj", "mlp.up_proj"), "mlp/w3": "mlp.down_proj"}
_HF_DINOV2_OLD_SWIGLU = {**_HF_DINOV2_MODULES, "mlp/w12": "mlp.weights_in", "mlp/w3": "mlp.weights_out"}  # < 5.0


def hf_dinov2_source(names: tuple[str, ...], *, old_swiglu: bool = False) -> Source:
    """Where a ViT parameter (path under 'params') lives in a transformers Dinov2Model state_dict."""
    top, leaf = names[0], "weight" if names[-1] in ("kernel", "scale") else "bias"
    if top == "patch_embed":
        return (f"embeddings.patch_embeddings.projection.{leaf}",), _conv_oihw if names[1] == "kernel" else _same
    if top in ("cls_token", "register_tokens"):
        return (f"embeddings.{top}",), _same
    if top == "pos_embed":
        return ("embeddings.position_embeddings",), _same
    if top == "norm":
        return (f"layernorm.{leaf}",), _same
    return _hf_block_source(names, f"encoder.layer.{int(top.split('_')[1])}.",
                            _HF_DINOV2_OLD_SWIGLU if old_swiglu else _HF_DINOV2_MODULES)


def _unit_layer_scales(state: Mapping) -> bool:
    """Whether every transformers layer_scale weight is exactly 1 (a ViT without LayerScale, exported)."""
    scales = [v for k, v in state.items() if ".layer_scale" in k]
    return bool(scales) and all(np.all(v == 1) for v in scales)


def hf_dinov2_to_flax(state: dict, hf_config: Mapping, *, arch: Mapping | None = None,
                      pos_interp: str | None = None, in_chans: int | None = None, what: str = "checkpoint"):
    """transformers Dinov2Model / Dinov2WithRegistersModel weights + config.json -> ({'params'}, config)."""
    model_type = hf_config.get("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ConvertError(f"{what}: config.json model_type={model_type!r} is not dinov2 or dinov2_with_registers")
    state = _strip_common_prefix(state, ("dinov2.",))  # Dinov2ForImageClassification keeps its backbone there
    _require(state, ("embeddings.patch_embeddings.projection.weight", "embeddings.cls_token",
                     "embeddings.position_embeddings", "layernorm.weight"), what)
    act = hf_config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConvertError(f"{what}: hidden_act={act!r} is not a GELU")
    width, chans, patch = state["embeddings.patch_embeddings.projection.weight"].shape[:3]
    registers = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0
    swiglu = bool(hf_config.get("use_swiglu_ffn", False))
    depth = _count_indices(state, r"encoder\.layer\.(\d+)\.")
    heads = int(hf_config.get("num_attention_heads", HEADS_BY_WIDTH.get(int(width), 0)))
    inferred = dict(
        variant=_variant_name(width, depth, patch), width=int(width), depth=depth, num_heads=heads,
        mlp_dim=int(width * hf_config.get("mlp_ratio", 4)), patch_size=int(patch),
        ffn="swiglu" if swiglu else "mlp",
        image_size=_grid_side(state["embeddings.position_embeddings"].shape[1], 1, what) * int(patch),
        in_chans=int(in_chans or chans), num_registers=int(registers),
        layerscale_init=None if _unit_layer_scales(state) else float(hf_config.get("layerscale_value", 1.0)),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-6)), qkv_bias=bool(hf_config.get("qkv_bias", True)),
        gelu_approximate=act != "gelu",
        pos_interp=pos_interp or ("size_aa" if model_type == "dinov2_with_registers" else "size"), pool="token")
    config = _vit_config(inferred, arch)
    what = f"{what} does not fit {_describe(config, arch)}"
    abstract = _vit_abstract(config, what)
    old_swiglu = "encoder.layer.0.mlp.weights_in.weight" in state  # transformers < 5 names
    source_of = functools.partial(hf_dinov2_source, old_swiglu=old_swiglu)
    no_layer_scale = config.get("layerscale_init") is None
    if no_layer_scale and not _unit_layer_scales(state) and any(".layer_scale" in k for k in state):
        raise ConvertError(f"{what}: its layer_scale weights are not all 1, the architecture has no LayerScale")
    params = _fill(abstract["params"], state, source_of,
                   ignore=lambda k: k == "embeddings.mask_token" or k.startswith("classifier.")
                   or (no_layer_scale and ".layer_scale" in k),
                   what=what, adapt=_adapt_in_chans(("patch_embed", "kernel"), config.get("in_chans")))
    return {"params": params}, config


# ------------------------------------------------------------------------------------- transformers DINOv3


_HF_DINOV3_MODULES = {
    "attn/qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attn/proj": "attention.o_proj",
    "mlp/fc1": "mlp.up_proj", "mlp/fc2": "mlp.down_proj", "mlp/w12": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp/w3": "mlp.down_proj"}


def hf_dinov3_source(names: tuple[str, ...]) -> Source:
    """Where a ViT parameter (path under 'params') lives in a transformers DINOv3ViTModel state_dict."""
    top, leaf = names[0], "weight" if names[-1] in ("kernel", "scale") else "bias"
    if top == "patch_embed":
        return (f"embeddings.patch_embeddings.{leaf}",), _conv_oihw if names[1] == "kernel" else _same
    if top in ("cls_token", "register_tokens"):
        return (f"embeddings.{top}",), _same
    if top == "norm":
        return (f"norm.{leaf}",), _same
    return _hf_block_source(names, f"layer.{int(top.split('_')[1])}.", _HF_DINOV3_MODULES)


def hf_dinov3_to_flax(state: dict, hf_config: Mapping, *, arch: Mapping | None = None, in_chans: int | None = None,
                      what: str = "checkpoint"):
    """transformers DINOv3ViTModel weights + config.json -> ({'params'}, config): RoPE positions
    (`position='rope'`), registers, LayerScale, plain or gated (SwiGLU) MLP. A projection without a bias
    (DINOv3's key projection; `*_bias: false` configs) gets a zero one, which computes the same."""
    model_type = hf_config.get("model_type", "dinov3_vit")
    if model_type == "dinov3_convnext":
        return dinov3_convnext_to_flax(state, layout="hf", arch=arch, in_chans=in_chans,
                                       ln_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
                                       act=hf_config.get("hidden_act", "gelu"), what=what)
    if model_type != "dinov3_vit":
        raise ConvertError(f"{what}: config.json model_type={model_type!r} is not dinov3_vit or dinov3_convnext")
    state = _strip_common_prefix(dict(state), ("dinov3.",))
    # Saved checkpoints name the blocks layer.N (the hub's), the module tree model.layer.N: accept both.
    state = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in state.items()}
    _require(state, ("embeddings.patch_embeddings.weight", "embeddings.cls_token", "norm.weight",
                     "layer.0.attention.q_proj.weight"), what)
    width, chans, patch = state["embeddings.patch_embeddings.weight"].shape[:3]
    depth = _count_indices(state, r"layer\.(\d+)\.")
    gated = "layer.0.mlp.gate_proj.weight" in state
    hidden = int(state["layer.0.mlp.up_proj.weight"].shape[0]) if "layer.0.mlp.up_proj.weight" in state else 0
    act = hf_config.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        raise ConvertError(f"{what}: hidden_act={act!r} with {'a gated' if gated else 'a plain'} MLP: medssl_jax's "
                           f"ViT has {'silu' if gated else 'exact gelu'} there")
    mlp_dim = hidden
    if gated:
        from medssl_jax.models.vit import swiglu_hidden_dim

        mlp_dim = hidden * 3 // 2
        if swiglu_hidden_dim(mlp_dim) != hidden:
            raise ConvertError(f"{what}: gated MLP width {hidden} is not one medssl_jax's SwiGLU rounding gives")
    for i in range(depth):  # a missing projection bias is a zero one
        for proj in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            weight = state.get(f"layer.{i}.{proj}.weight")
            if weight is not None and f"layer.{i}.{proj}.bias" not in state:
                state[f"layer.{i}.{proj}.bias"] = np.zeros(weight.shape[0], np.float32)
    registers = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0
    if registers == 0:
        state.pop("embeddings.register_tokens", None)
    size = hf_config.get("image_size", 224)
    inferred = dict(
        variant=_variant_name(width, depth, patch), width=int(width), depth=depth,
        num_heads=int(hf_config.get("num_attention_heads", HEADS_BY_WIDTH.get(int(width), 0))),
        mlp_dim=int(mlp_dim), patch_size=int(patch), ffn="swiglu" if gated else "mlp",
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size), in_chans=int(in_chans or chans),
        num_registers=int(registers),
        layerscale_init=None if _unit_layer_scales(state) else float(hf_config.get("layerscale_value", 1.0)),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-5)), qkv_bias=True, gelu_approximate=False,
        position="rope", rope_theta=float(hf_config.get("rope_theta", 100.0)), pool="token")
    config = _vit_config(inferred, arch)
    what = f"{what} does not fit {_describe(config, arch)}"
    abstract = _vit_abstract(config, what)
    no_layer_scale = config.get("layerscale_init") is None
    params = _fill(abstract["params"], state, hf_dinov3_source,
                   ignore=lambda k: k == "embeddings.mask_token" or (no_layer_scale and ".layer_scale" in k),
                   what=what, adapt=_adapt_in_chans(("patch_embed", "kernel"), config.get("in_chans")))
    return {"params": params}, config


def dinov3_hub_to_flax(state: dict, *, arch: Mapping | None = None, num_heads: int | None = None,
                       in_chans: int | None = None, what: str = "checkpoint"):
    """Official DINOv3 hub ViT state_dict (`dinov3_vit*16*_pretrain_*.pth`) -> ({'params'}, config), through
    the DINOv2 hub names it shares: `storage_tokens` are the registers, the SwiGLU's w1 / w2 (gate / up)
    are fused to w12, the key part of the qkv bias is multiplied by the stored `bias_mask` (zero: DINOv3
    masks it), `rope_embed.periods` must be base-100-style periods (base^(4j / head_dim)), whose base is
    kept. The released models all use LayerNorm eps 1e-5 ('layernormbf16'); another eps goes in `arch`."""
    state = dict(state)
    if "downsample_layers.0.0.weight" in state:  # dinov3_convnext_*_pretrain_*.pth
        return dinov3_convnext_to_flax(state, layout="hub", arch=arch, in_chans=in_chans, what=what)
    _require(state, ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "norm.weight"), what)
    if "cls_norm.weight" in state:
        raise ConvertError(f"{what}: cls_norm.weight (a separate final norm of the CLS token, untie_cls_and_patch_norms)"
                           " has no slot in medssl_jax's ViT yet")
    width, chans, patch = state["patch_embed.proj.weight"].shape[:3]
    depth = _count_indices(state, r"blocks\.(\d+)\.")
    heads = num_heads or HEADS_BY_WIDTH.get(int(width))
    if heads is None and not (arch and ("num_heads" in arch or "variant" in arch)):
        raise ConvertError(f"{what}: cannot infer the head count of width {width}; give num_heads")
    head_dim = int(width) // int(heads or (arch or {}).get("num_heads", 1))
    periods = state.pop("rope_embed.periods", None)
    base = 100.0
    if periods is not None:
        periods = np.asarray(periods, np.float64)
        base = float(periods[1] ** (head_dim / 4)) if len(periods) > 1 else 100.0
        expected = base ** (4 * np.arange(len(periods)) / head_dim)
        if len(periods) != head_dim // 4 or not np.allclose(periods, expected, rtol=1e-5):
            raise ConvertError(f"{what}: rope_embed.periods are not base^(4j / head_dim) periods for head dim "
                               f"{head_dim} (min/max-period RoPE is not supported)")
    for i in range(depth):
        mask = state.pop(f"blocks.{i}.attn.qkv.bias_mask", None)
        if mask is not None and f"blocks.{i}.attn.qkv.bias" in state:
            if not np.all(np.isfinite(mask)):
                raise ConvertError(f"{what}: blocks.{i}.attn.qkv.bias_mask holds NaN (an uninitialised mask)")
            state[f"blocks.{i}.attn.qkv.bias"] = state[f"blocks.{i}.attn.qkv.bias"] * mask
        for leaf in ("weight", "bias"):
            gate, up = state.pop(f"blocks.{i}.mlp.w1.{leaf}", None), state.pop(f"blocks.{i}.mlp.w2.{leaf}", None)
            if gate is not None and up is not None:
                state[f"blocks.{i}.mlp.w12.{leaf}"] = np.concatenate([gate, up], axis=0)
    if "storage_tokens" in state:
        tokens = state.pop("storage_tokens")
        if tokens.shape[1]:
            state["register_tokens"] = tokens
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = state["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    mlp_dim = hidden // 2 * 3 // 2 if swiglu else hidden
    if swiglu:
        from medssl_jax.models.vit import swiglu_hidden_dim

        if swiglu_hidden_dim(mlp_dim) != hidden // 2:
            raise ConvertError(f"{what}: SwiGLU width {hidden // 2} is not one medssl_jax's rounding gives")
    inferred = dict(
        variant=_variant_name(width, depth, patch), width=int(width), depth=depth, num_heads=heads,
        mlp_dim=int(mlp_dim), patch_size=int(patch), ffn="swiglu" if swiglu else "mlp",
        image_size=224 // int(patch) * int(patch), in_chans=int(in_chans or chans),
        num_registers=int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in state else None, ln_eps=1e-5,
        qkv_bias="blocks.0.attn.qkv.bias" in state, gelu_approximate=False, position="rope", rope_theta=base,
        pool="token")
    config = _vit_config(inferred, arch)
    what = f"{what} does not fit {_describe(config, arch)}"
    abstract = _vit_abstract(config, what)
    params = _fill(abstract["params"], state, dinov2_source,
                   ignore=lambda k: k == "mask_token" or k.startswith(("head.", "local_cls_norm.")), what=what,
                   adapt=_adapt_in_chans(("patch_embed", "kernel"), config.get("in_chans")))
    return {"params": params}, config


# ----------------------------------------------------------------------------------------- DINOv3 ConvNeXt

# Where our ConvNeXt's modules live in DINOv3's hub layout (dinov3 `models/convnext.py`), transformers'
# DINOv3ConvNextModel and timm's ConvNeXt. Stage s's downsampling is [conv, norm] for s = 0, [norm, conv] after.
_CONVNEXT_LAYOUTS = {
    "hub": {"stem": "downsample_layers.0.{i}", "down": "downsample_layers.{s}.{i}", "block": "stages.{s}.{j}.",
            "final": "norm",
            "modules": {"dwconv": "dwconv", "norm": "norm", "pwconv1": "pwconv1", "pwconv2": "pwconv2"}},
    "hf": {"stem": "stages.0.downsample_layers.{i}", "down": "stages.{s}.downsample_layers.{i}",
           "block": "stages.{s}.layers.{j}.", "final": "layer_norm",
           "modules": {"dwconv": "depthwise_conv", "norm": "layer_norm", "pwconv1": "pointwise_conv1",
                       "pwconv2": "pointwise_conv2"}},
    # timm's ConvNeXt (what `medssl_jax.export --format=timm` writes): its head.norm is the norm of the pooled
    # map, i.e. DINOv3's CLS token.
    "timm": {"stem": "stem.{i}", "down": "stages.{s}.downsample.{i}", "block": "stages.{s}.blocks.{j}.",
             "final": "head.norm",
             "modules": {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}},
}


def _convnext_down_key(keys: Mapping, stage: int, part: int) -> str:
    """Stage `stage`'s downsampling part (0 conv / 1 norm for the stem, 0 norm / 1 conv after)."""
    return keys["stem"].format(i=part) if stage == 0 else keys["down"].format(s=stage, i=part)


def convnext_source(names: tuple[str, ...], *, layout: str) -> Source:
    """Where a ConvNeXt parameter (path under 'params') lives in a DINOv3 ConvNeXt state_dict."""
    keys = _CONVNEXT_LAYOUTS[layout]
    top, leaf = names[0], "weight" if names[-1] in ("kernel", "scale") else "bias"
    conv = _conv_oihw if names[-1] == "kernel" else _same
    if top == "norm":
        return (f"{keys['final']}.{leaf}",), _same
    if top in ("stem", "stem_norm"):
        return (_convnext_down_key(keys, 0, 0 if top == "stem" else 1) + f".{leaf}",), conv
    if top.startswith("downsample"):
        stage = int(top[len("downsample")])
        return (_convnext_down_key(keys, stage, 0 if top.endswith("_norm") else 1) + f".{leaf}",), conv
    stage, block = (int(part) for part in re.match(r"stage(\d+)_block(\d+)", top).groups())
    prefix = keys["block"].format(s=stage - 1, j=block)
    if names[1] == "gamma":
        return (prefix + "gamma",), _same
    module = keys["modules"][names[1]]
    fn = _linear_t if names[1].startswith("pwconv") and leaf == "weight" else conv
    return (f"{prefix}{module}.{leaf}",), fn


def dinov3_convnext_to_flax(state: dict, *, layout: str, arch: Mapping | None = None, in_chans: int | None = None,
                            ln_eps: float = 1e-6, act: str = "gelu", what: str = "checkpoint"):
    """DINOv3 ConvNeXt weights (hub `dinov3_convnext_*_pretrain_*.pth`, a transformers DINOv3ConvNextModel
    directory, or timm's ConvNeXt layout) -> ({'params'}, config) of medssl_jax.models.convnext.ConvNeXt;
    depths, widths, input channels and LayerScale are read from the tensors."""
    from medssl_jax import models
    from medssl_jax.models import convnext

    if act != "gelu":
        raise ConvertError(f"{what}: hidden_act={act!r}: medssl_jax's ConvNeXt uses exact gelu")
    keys = _CONVNEXT_LAYOUTS[layout]
    state = {re.sub(r"^model\.stages\.", "stages.", k): v for k, v in state.items()}  # module tree vs saved names
    stem = _convnext_down_key(keys, 0, 0) + ".weight"
    _require(state, (stem, f"{keys['final']}.weight"), what)
    convs = [_convnext_down_key(keys, stage, 0 if stage == 0 else 1) + ".weight" for stage in range(4)]
    dims = [int(state[k].shape[0]) for k in convs if k in state]
    block_key = keys["block"].replace(".", r"\.").format(s=r"(\d+)", j=r"(\d+)")
    depths = [0] * 4
    for k in state:
        if m := re.match(block_key, k):
            stage, block = int(m.group(1)), int(m.group(2))
            if stage < 4:
                depths[stage] = max(depths[stage], block + 1)
    if len(dims) != 4 or min(depths) < 1:
        raise ConvertError(f"{what}: not a four-stage ConvNeXt (stage widths {dims}, blocks per stage {depths})")
    size = next((name for name, v in convnext.SIZES.items()
                 if list(v["depths"]) == depths and list(v["dims"]) == dims), "")
    config = {"name": "convnext", "size": size, "depths": depths, "dims": dims,
              "in_chans": int(in_chans or state[stem].shape[1]),
              "layerscale_init": 1e-6 if keys["block"].format(s=0, j=0) + "gamma" in state else None,
              "ln_eps": float(ln_eps), **dict(arch or {})}
    described = f"convnext(depths={depths}, dims={dims}, {'as chosen' if arch else 'inferred from the checkpoint'})"
    what = f"{what} does not fit {described}"
    try:
        model = models.build_encoder({**config, "dtype": "float32"})
        abstract = _abstract_variables(model, (32, 32), model.in_chans)
    except ValueError as error:
        raise ConvertError(f"{what}: {error}") from None
    params = _fill(abstract["params"], state, functools.partial(convnext_source, layout=layout),
                   ignore=lambda k: k.startswith("head."), what=what,
                   adapt=_adapt_in_chans(("stem", "kernel"), config.get("in_chans")))
    return {"params": params}, config


# ------------------------------------------------------------------------------------------- timm (PyTorch)


def timm_to_flax(state: dict, *, arch: Mapping | None = None, num_heads: int | None = None,
                 pos_interp: str | None = None, in_chans: int | None = None, what: str = "checkpoint"):
    """A timm VisionTransformer state_dict (CLS token; optional `reg_token`) -> Flax, through the DINOv2
    layout it shares. timm gives every prefix token a position row unless `no_embed_class`: the register
    rows are added to the register tokens (zero in medssl_jax's own exports), and a `no_embed_class`
    pos_embed without a CLS row gets a zero one; either way the encoder computes what timm computes."""
    state = dict(state)
    _require(state, ("patch_embed.proj.weight", "cls_token", "pos_embed"), what)
    rows = state["pos_embed"].shape[1]
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0

    def square(n):
        return n > 0 and math.isqrt(n) ** 2 == n

    pos = state["pos_embed"]
    if registers and not square(rows - 1) and square(rows - 1 - registers):
        state["register_tokens"] = state.pop("reg_token") + pos[:, 1:1 + registers]
        state["pos_embed"] = np.concatenate([pos[:, :1], pos[:, 1 + registers:]], axis=1)
    elif square(rows) and not square(rows - 1):  # no_embed_class: no CLS row
        state["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        if registers:
            state["register_tokens"] = state.pop("reg_token")
    elif registers:
        state["register_tokens"] = state.pop("reg_token")
    return dinov2_to_flax(state, arch=arch, num_heads=num_heads, pos_interp=pos_interp or "size",
                          in_chans=in_chans, what=what)


# ------------------------------------------------------------------------------------------- timm / augreg


def timm_npz_to_flax(npz: dict, *, arch: Mapping | None = None, pos_interp: str | None = None,
                     in_chans: int | None = None, what: str = "checkpoint"):
    """Original JAX ViT .npz (augreg / vision_transformer layout, as timm's _load_weights reads) -> Flax."""
    state = dict(npz)
    for prefix in ("opt/target/", "params/"):
        if "embedding/kernel" not in state and f"{prefix}embedding/kernel" in state:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    _require(state, ("embedding/kernel", "Transformer/encoder_norm/scale"), what)
    if "cls" not in state or "Transformer/posembed_input/pos_embedding" not in state:
        raise ConvertError(f"{what}: no 'cls' token / 'Transformer/posembed_input/pos_embedding': ViTs without "
                           "a CLS token (big_vision pool='gap' models) are not supported")
    # Scanned checkpoints stack all blocks in 'Transformer/encoderblock/...': unstack them.
    stacked = {k: v for k, v in state.items() if k.startswith("Transformer/encoderblock/")}
    for key, value in stacked.items():
        del state[key]
        for i in range(value.shape[0]):
            state[key.replace("encoderblock/", f"encoderblock_{i}/")] = value[i]
    big_vision = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in state
    mha, ln2, mlp = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else
                     ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
    patch, _, chans, width = state["embedding/kernel"].shape
    depth = _count_indices(state, r"Transformer/encoderblock_(\d+)/")
    _require(state, (f"Transformer/encoderblock_0/{mha}/query/kernel", f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel"), what)
    inferred = dict(
        variant=_variant_name(width, depth, patch), width=int(width), depth=depth,
        num_heads=int(state[f"Transformer/encoderblock_0/{mha}/query/kernel"].shape[1]),
        mlp_dim=int(state[f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel"].shape[1]), patch_size=int(patch),
        ffn="mlp",
        image_size=_grid_side(state["Transformer/posembed_input/pos_embedding"].shape[1], 1, what) * int(patch),
        in_chans=int(in_chans or chans), num_registers=0, layerscale_init=None, ln_eps=1e-6, qkv_bias=True,
        gelu_approximate=False, pos_interp=pos_interp or "size", pool="token")
    config = _vit_config(inferred, arch)
    what = f"{what} does not fit {_describe(config, arch)}"
    abstract = _vit_abstract(config, what)

    def flat_heads(a):  # [D, H, hd] -> [D, H*hd]
        return a.reshape(a.shape[0], -1)

    def qkv_kernel(q, k, v):
        return np.concatenate([flat_heads(q), flat_heads(k), flat_heads(v)], axis=1)

    def qkv_bias(q, k, v):
        return np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])

    def out_kernel(a):  # [H, hd, D] -> [H*hd, D]
        return a.reshape(-1, a.shape[-1])

    def source_of(names) -> Source:
        top, leaf = names[0], names[-1]
        if top == "patch_embed":
            return (f"embedding/{leaf}",), _same
        if top == "cls_token":
            return ("cls",), _same
        if top == "pos_embed":
            return ("Transformer/posembed_input/pos_embedding",), _same
        if top == "norm":
            return (f"Transformer/encoder_norm/{leaf}",), _same
        block = f"Transformer/encoderblock_{int(top.split('_')[1])}/"
        part = names[1]
        if part == "norm1":
            return (f"{block}LayerNorm_0/{leaf}",), _same
        if part == "norm2":
            return (f"{block}{ln2}/{leaf}",), _same
        if part == "attn" and names[2] == "qkv":
            return tuple(f"{block}{mha}/{n}/{leaf}" for n in ("query", "key", "value")), (
                qkv_kernel if leaf == "kernel" else qkv_bias)
        if part == "attn":
            return (f"{block}{mha}/out/{leaf}",), out_kernel if leaf == "kernel" else _same
        if part == "mlp":
            return (f"{block}{mlp}/Dense_{0 if names[2] == 'fc1' else 1}/{leaf}",), _same
        return (f"<no source for {'/'.join(names)}>",), _same

    params = _fill(abstract["params"], state, source_of,
                   ignore=lambda k: k.startswith(("head/", "pre_logits/")), what=what,
                   adapt=_adapt_in_chans(("patch_embed", "kernel"), config.get("in_chans")))
    return {"params": params}, config


# ------------------------------------------------------------------------------------- torchvision ResNet


def _resnet_abstract(config: dict, arch: Mapping | None, channels: int, what: str):
    """(config with the caller's `arch` fields, the abstract variables of that ResNet, the error prefix)."""
    from medssl_jax import models

    if arch:
        unknown = sorted(set(arch) - {"name", "depth", "width", "base_width", "zero_init_last_bn", "dtype",
                                       "stem_pool", "cifar_stem"})
        if unknown:
            raise ConvertError(f"architecture fields {unknown} are not ResNet attributes")
        config = {**config, **arch}
    what = f"{what} does not fit {_describe(config, arch)}"
    try:
        model = models.build_encoder({**config, "dtype": "float32"})
        return config, _abstract_variables(model, (64, 64), channels), what
    except ValueError as error:
        raise ConvertError(f"{what}: {error}") from None


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torchvision_source(names: tuple[str, ...]) -> Source:
    """Where a ResNet variable (path with its collection, 'params' / 'batch_stats') lives in a torchvision
    ResNet state_dict (stage s block b -> layer{s}.{b}; the projection shortcut -> downsample)."""
    names = names[1:]  # drop the collection
    if names[0] == "stem":
        module = {"conv": "conv1", "bn": "bn1"}[names[1]]
    else:
        stage, block = re.match(r"stage(\d+)_block(\d+)", names[0]).groups()
        prefix = f"layer{stage}.{block}."
        if names[1] == "proj":
            module = prefix + ("downsample.0" if names[2] == "conv" else "downsample.1")
        else:
            module = prefix + ("conv" if names[2] == "conv" else "bn") + names[1][len("conv_bn"):]
    if names[-1] == "kernel":
        return (module + ".weight",), _conv_oihw
    return (f"{module}.{_BN_NAMES[names[-1]]}",), _same


def torchvision_resnet_to_flax(state: dict, *, arch: Mapping | None = None, in_chans: int | None = None,
                               what: str = "checkpoint"):
    """torchvision ResNet state_dict -> ({'params', 'batch_stats'}, config) for models.resnet.ResNet.

    Only the bottleneck depths (50/101/152) map one-to-one: our ResNet (SimCLR layout) gives the first
    block of every stage a projection shortcut, which torchvision's ResNet-18/34 lack in stage 1.
    Outputs equal torchvision's where the stem max-pool pads alike: torchvision pads 1 on both sides, our
    ResNet's 'SAME' pool pads (1, 1) when the stem output is odd (e.g. 34 or 66 px inputs) but (0, 1) when
    it is even (224 px), so the exported config selects `stem_pool='torch'`.
    """
    _require(state, ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight"), what)
    blocks = tuple(_count_indices(state, rf"layer{s}\.(\d+)\.") for s in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = next((d for d, (sizes, bn) in STAGE_SIZES.items() if sizes == blocks and bn == bottleneck), None)
    if depth is None and not (arch and "depth" in arch):
        raise ConvertError(f"{what}: blocks per stage {blocks} ({'bottleneck' if bottleneck else 'basic'}) "
                           "match no ResNet depth")
    config = {"name": "resnet", "depth": depth, "width": 1, "base_width": int(state["conv1.weight"].shape[0])}
    # torchvision's max-pool pads 1 on both sides; SimCLR's 'SAME' pads (0, 1) on even sizes (224 px).
    config["stem_pool"] = "torch"
    if state["conv1.weight"].shape[-1] == 3:  # a 3x3 stem (our cifar_stem export, CIFAR-style ResNets)
        config["cifar_stem"] = True
    config, abstract, what = _resnet_abstract(config, arch, int(in_chans or state["conv1.weight"].shape[1]), what)

    ignore = lambda k: k.endswith("num_batches_tracked") or k.startswith("fc.")  # noqa: E731
    variables = _fill(abstract, state, torchvision_source, ignore=ignore, what=what,
                      adapt=_adapt_in_chans(("params", "stem", "conv", "kernel"), in_chans))
    return variables, config


# ------------------------------------------------------------------------------------------------ SimCLR (TF)

# Convolutions of SimCLR's ResNet (stem + 1 projection per stage + 2 or 3 per block) -> depth.
_SIMCLR_CONVS = {1 + 4 + sum(sizes) * (3 if bottleneck else 2): depth
                 for depth, (sizes, bottleneck) in STAGE_SIZES.items()}


class _TFCheckpointTensors(Mapping):
    """The float tensors of a TensorFlow checkpoint by variable name, each read (and CRC-checked) only when
    asked for: a SimCLR checkpoint also holds a Momentum slot per variable and heads nobody converts."""

    def __init__(self, reader):
        self._reader = reader
        self._names = [n for n in reader.names()
                       if reader.dtype(n) is not None and np.dtype(reader.dtype(n)).kind == "f"]
        self._known = set(self._names)

    def __getitem__(self, name):
        from medssl_jax.models import tf_bundle

        if name not in self._known:
            raise KeyError(name)
        try:
            return self._reader.tensor(name)
        except tf_bundle.BundleError as error:
            raise ConvertError(str(error)) from None

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __contains__(self, name):
        return name in self._known


def read_tf_checkpoint(path: str) -> Mapping[str, np.ndarray]:
    """The float tensors of a TensorFlow checkpoint (prefix, .index file or folder), read on access."""
    from medssl_jax.models import tf_bundle

    try:
        return _TFCheckpointTensors(tf_bundle.CheckpointReader(path))
    except (tf_bundle.BundleError, OSError) as error:
        raise ConvertError(str(error)) from None


def simclr_tf_resnet_to_flax(state: dict, *, arch: Mapping | None = None, in_chans: int | None = None,
                             what: str = "checkpoint"):
    """google-research/simclr TF1 checkpoint tensors -> ({'params', 'batch_stats'}, config) for our ResNet.

    SimCLR's resnet.py builds its layers with tf.layers under the 'base_model' scope, so TensorFlow names
    them by creation order: the k-th convolution is conv2d_k (conv2d for k = 0) and its BatchNorm is
    batch_normalization_k; per block the projection shortcut comes first, then the 1x1/3x3/1x1 (or two 3x3)
    convolutions. Our ResNet has SimCLR's layout (fixed padding, SAME stem pool, a projection in the first
    block of every stage), so the k-th convolution of ours in the same order is the k-th of theirs; kernels
    are HWIO in both. The heads, optimiser slots (…/Momentum) and the global step are ignored.
    """
    prefix = "base_model/" if any(k.startswith("base_model/") for k in state) else ""
    conv = re.compile(rf"^{re.escape(prefix)}conv2d(?:_(\d+))?/kernel$")
    indices = sorted(int(m.group(1) or 0) for k in state if (m := conv.match(k)))
    if not indices:
        raise ConvertError(f"{what}: no {prefix}conv2d*/kernel tensors (not a google-research/simclr TF1 "
                           "checkpoint; TF2 SavedModels of tf2/ are not read)")
    if indices != list(range(len(indices))):
        raise ConvertError(f"{what}: convolution indices {indices[:3]}... are not consecutive from 0")
    if any("/sk_conv" in k or "/se_" in k for k in state) or len(indices) not in _SIMCLR_CONVS:
        raise ConvertError(f"{what}: {len(indices)} convolutions match no SimCLR ResNet depth (selective-kernel "
                           "'_sk1' and squeeze-excitation checkpoints are not supported; use an _sk0 one)")
    depth = _SIMCLR_CONVS[len(indices)]
    stem = state[f"{prefix}conv2d/kernel"]
    config = {"name": "resnet", "depth": depth, "width": max(1, int(stem.shape[-1]) // 64), "base_width": 64,
              "stem_pool": "same"}
    if int(stem.shape[-1]) % 64:
        config.update(width=1, base_width=int(stem.shape[-1]))
    config, abstract, what = _resnet_abstract(config, arch, int(in_chans or stem.shape[2]), what)

    # Our convolution modules in SimCLR's creation order -> TF layer index.
    sizes, bottleneck = STAGE_SIZES[config["depth"]]
    order = ["stem"]
    for stage, blocks in enumerate(sizes, start=1):
        for block in range(blocks):
            order += ([f"stage{stage}_block{block}/proj"] if block == 0 else [])
            order += [f"stage{stage}_block{block}/conv_bn{i}" for i in range(1, (4 if bottleneck else 3))]
    tf_index = {module: k for k, module in enumerate(order)}
    bn_names = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}

    def source_of(names) -> Source:
        names = names[1:]  # drop the collection ('params' / 'batch_stats')
        k = tf_index["/".join(names[:-2]) if names[0] != "stem" else "stem"]
        suffix = "" if k == 0 else f"_{k}"
        if names[-1] == "kernel":
            return (f"{prefix}conv2d{suffix}/kernel",), _same
        return (f"{prefix}batch_normalization{suffix}/{bn_names[names[-1]]}",), _same

    def ignore(key: str) -> bool:
        return not key.startswith(prefix) or key.endswith("/Momentum") or "/Momentum" in key or key == "global_step"

    variables = _fill(abstract, state, source_of, ignore=ignore, what=what,
                      adapt=_adapt_in_chans(("params", "stem", "conv", "kernel"), in_chans))
    return variables, config


# ------------------------------------------------------------------------------------------------ driver


def convert(fmt: str, path: str, *, arch: Mapping | None = None, num_heads: int | None = None,
            pos_interp: str | None = None, in_chans: int | None = None) -> tuple[dict, dict]:
    """Reads `path` in format `fmt` -> (variables, export config {'model': ..., 'source': ...})."""
    if fmt not in FORMATS:
        raise ConvertError(f"format {fmt!r} is not one of {FORMATS}")
    if in_chans not in (None, 1, 3):
        raise ConvertError(f"in_chans={in_chans} is not 1 or 3")
    what = os.path.basename(os.path.normpath(path)) or path
    if fmt == "dinov2":
        variables, model = dinov2_to_flax(read_torch_state_dict(path), arch=arch, num_heads=num_heads,
                                          pos_interp=pos_interp, in_chans=in_chans, what=what)
        weights_file = path
    elif fmt == "hf-dinov2":
        state, hf_config = read_hf_directory(path)
        variables, model = hf_dinov2_to_flax(state, hf_config, arch=arch, pos_interp=pos_interp, in_chans=in_chans,
                                             what=what)
        weights_file = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
    elif fmt == "dinov3":
        variables, model = dinov3_hub_to_flax(read_torch_state_dict(path), arch=arch, num_heads=num_heads,
                                              in_chans=in_chans, what=what)
        weights_file = path
    elif fmt == "hf-dinov3":
        state, hf_config = read_hf_directory(path)
        variables, model = hf_dinov3_to_flax(state, hf_config, arch=arch, in_chans=in_chans, what=what)
        weights_file = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
    elif fmt in SIDECARS:
        state, sidecar, weights_file = read_weights_with_sidecar(path, SIDECARS[fmt])
        if fmt == "timm" and "stem.0.weight" in state:  # timm's ConvNeXt (e.g. our export of one)
            variables, model = dinov3_convnext_to_flax(state, layout="timm", arch=arch, in_chans=in_chans, what=what)
        elif fmt == "timm":
            kwargs = sidecar.get("kwargs", {})
            pool = {"token": "token", "avg": "gap"}.get(kwargs.get("global_pool"))
            arch = {**({"pool": pool} if pool else {}), **(arch or {})} or None
            variables, model = timm_to_flax(state, arch=arch, num_heads=num_heads or kwargs.get("num_heads"),
                                            pos_interp=pos_interp, in_chans=in_chans, what=what)
        else:
            if sidecar.get("stem_pool"):
                arch = {"stem_pool": sidecar["stem_pool"], **(arch or {})}
            variables, model = torchvision_resnet_to_flax(state, arch=arch, in_chans=in_chans, what=what)
    elif fmt == "timm-npz":
        variables, model = timm_npz_to_flax(read_npz(path), arch=arch, pos_interp=pos_interp, in_chans=in_chans,
                                            what=what)
        weights_file = path
    elif fmt == "simclr-tf":
        from medssl_jax.models import tf_bundle

        try:
            prefix = tf_bundle.resolve_prefix(path)
        except tf_bundle.BundleError as error:
            raise ConvertError(str(error)) from None
        what = os.path.basename(prefix)
        variables, model = simclr_tf_resnet_to_flax(read_tf_checkpoint(prefix), arch=arch, in_chans=in_chans,
                                                    what=what)
        weights_file = prefix + ".index"  # holds every tensor's CRC-32C: its hash fingerprints the data too
    source = {"format": fmt, "file": os.path.basename(weights_file), "sha256": file_sha256(weights_file)}
    mean, std, size, origin = input_normalization(fmt, path)
    if in_chans == 1 and len(mean) == 3:
        # The first layer was summed over RGB, so per-channel values cannot be applied any more.
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        origin += "; averaged over RGB for the summed 1-channel first layer (approximate; the default 3-channel " \
                  "conversion applies them exactly to a grey image replicated to RGB)"
    model = {**model, "input_mean": list(mean), "input_std": list(std)}
    return variables, {"model": model, "source": source,
                       "input": {"image_size": size, "normalization": {"mean": list(mean), "std": list(std),
                                                                       "from": origin}}}


def read_weights_with_sidecar(path: str, sidecar_name: str) -> tuple[dict, dict, str]:
    """(state_dict, the sidecar JSON or {}, the weights file) of a .pth / .safetensors file or of a directory
    holding model.safetensors (a medssl_jax export to PyTorch, with its `sidecar_name`)."""
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(weights):
        raise ConvertError(f"{path}: a directory without model.safetensors")
    state = read_safetensors(weights) if weights.endswith(".safetensors") else read_torch_state_dict(weights)
    sidecar_path = os.path.join(os.path.dirname(os.path.abspath(weights)), sidecar_name)
    sidecar = {}
    if os.path.isfile(sidecar_path):
        with open(sidecar_path) as f:
            sidecar = json.load(f)
    return state, sidecar, weights


def input_normalization(fmt: str, path: str) -> tuple[tuple, tuple, int, str]:
    """(mean, std, training resolution, where they come from) of a converted encoder's input."""
    from medssl_jax.models.input_norm import IMAGENET_MEAN, IMAGENET_STD

    if fmt in SIDECARS:
        directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        sidecar = os.path.join(directory, SIDECARS[fmt])
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                recorded = json.load(f).get("input", {})
            if "mean" in recorded:
                return (tuple(recorded["mean"]), tuple(recorded["std"]), int(recorded["image_size"]),
                        f"{SIDECARS[fmt]} (a medssl_jax export)")

    if fmt == "simclr-tf":  # SimCLR's input pipeline: RGB in [0, 1], no mean/std (data_util.preprocess_image)
        return (), (), 224, "SimCLR (RGB in [0, 1], no normalisation)"
    if fmt == "dinov3" and "sat493m" in os.path.basename(path):  # DINOv3's satellite models (their README)
        return (0.430, 0.411, 0.296), (0.213, 0.156, 0.143), 224, "DINOv3 SAT-493M (the satellite models' transform)"
    if fmt == "timm-npz":  # the augreg ViTs see pixels in [-1, 1]
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, "timm augreg (inputs in [-1, 1])"
    if fmt in ("hf-dinov2", "hf-dinov3"):
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        pre = os.path.join(directory, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                p = json.load(f)
            if not p.get("do_normalize", True):
                return (), (), _hf_size(p), "preprocessor_config.json (do_normalize false)"
            if "image_mean" in p and "image_std" in p:
                return tuple(p["image_mean"]), tuple(p["image_std"]), _hf_size(p), "preprocessor_config.json"
        return IMAGENET_MEAN, IMAGENET_STD, 224, "ImageNet (no preprocessor_config.json: transformers' default)"
    return IMAGENET_MEAN, IMAGENET_STD, 224, "ImageNet (the training transform of the " + (
        {"dinov2": "DINOv2 hub models)", "dinov3": "DINOv3 LVD-1689M models)", "timm": "timm ViTs without a timm.json; augreg ones use 0.5 / 0.5)"}.get(
            fmt, "torchvision weights)"))


def _hf_size(preprocessor: Mapping) -> int:
    crop = preprocessor.get("crop_size") or preprocessor.get("size") or {}
    if isinstance(crop, int):
        return crop
    return int(crop.get("height") or crop.get("shortest_edge") or 224)


def num_parameters(variables: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables.get("params", variables))))
