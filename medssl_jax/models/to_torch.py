"""Weight export: Flax variables of our encoders -> PyTorch state_dicts that torchvision, timm and
transformers models load with strict=True, and the code that builds those models.

The mappings are the importers' (medssl_jax.models.convert) run backwards: every Flax leaf has one source
in the target layout (`torchvision_source`, `dinov2_source` for timm, `hf_dinov2_source`) and its inverse
transform (transpose, split of a fused qkv / SwiGLU kernel). A leaf with no slot in the target fails in
one line naming it; `check_round_trip` imports the result again and requires the same variables bit for
bit, so an export that loads but means something else cannot be written.

What each layout cannot express, and what happens instead:
  torchvision  our ResNet is SimCLR's: the first block of every stage has a projection shortcut, which
               torchvision's ResNet-18/34 lack in stage 1 (`torchvision_resnet` adds it), and the stem
               width and every stage scale with the width multiplier (torchvision's wide_resnet only widens
               the bottleneck). The 'same' stem max-pool (TF padding (0, 1)) is MaxPool2d(ceil_mode=True),
               exact when the stem output is even, i.e. image sides divisible by 4 (28, 64, 224 px).
  timm         ConvNeXt (ours is DINOv3's, which is timm's layout: features = the normed pooled map), or
               VisionTransformer with the CLS token; register tokens get zero rows in `pos_embed`
               (timm adds position embeddings to the registers, ours do not); no SwiGLU (ViT-g: use hf)
               and no 'token+gap' pooling (timm pools 'token' or 'avg').
  hf           transformers Dinov2Model / Dinov2WithRegistersModel: LayerScale is always there (ones when
               ours has none, which is the same function); its pooler_output is the normed CLS token, so
               'gap' / 'token+gap' features are computed from last_hidden_state (`hf_features`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import numpy as np

from medssl_jax import sharding
from medssl_jax.models import convert, convnext
from medssl_jax.models.resnet import STAGE_SIZES

FORMATS = ("torchvision", "timm", "hf")


class ExportError(ValueError):
    """An encoder that cannot be exported to the asked layout; the one-line message names the layer."""


# Inverses of the importers' transforms: Flax array, number of target tensors -> target tensors.
_INVERSE: dict[Callable, Callable] = {
    convert._same: lambda a, n: [a],
    convert._linear_t: lambda a, n: [a.T],
    convert._conv_oihw: lambda a, n: [a.transpose(3, 2, 0, 1)],
    convert._concat_linear_t: lambda a, n: np.split(a.T, n, axis=0),
    convert._concat: lambda a, n: np.split(a, n, axis=0),
}


def _leaves(tree) -> list[tuple[tuple[str, ...], np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(sharding.path_names(path), np.asarray(leaf, np.float32)) for path, leaf in flat]


def invert(tree, source_of: Callable, *, target: str) -> dict[str, np.ndarray]:
    """The target-layout state_dict of a Flax tree whose leaves `source_of` maps (the importer's map)."""
    state = {}
    for names, leaf in _leaves(tree):
        try:
            keys, fn = source_of(names)
        except (KeyError, AttributeError, ValueError, IndexError):
            keys, fn = (), None
        if not keys or fn not in _INVERSE or any(k.startswith("<") for k in keys):
            raise ExportError(f"{'/'.join(names)} has no slot in the {target} layout")
        for key, part in zip(keys, _INVERSE[fn](leaf, len(keys))):
            state[key] = np.ascontiguousarray(part, np.float32)
    return state


# ------------------------------------------------------------------------------------------------ ResNet


def resnet_spec(model: Mapping, channels: int) -> dict:
    """What `torchvision_resnet` needs to build the torchvision twin of our ResNet."""
    depth = int(model.get("depth", 50))
    if depth not in STAGE_SIZES:
        raise ExportError(f"ResNet depth={depth} is not one of {sorted(STAGE_SIZES)}")
    sizes, bottleneck = STAGE_SIZES[depth]
    stem = int(model.get("base_width", 64)) * int(model.get("width", 1))
    return {"depth": depth, "blocks_per_stage": list(sizes), "bottleneck": bool(bottleneck), "stem_width": stem,
            "in_chans": int(channels), "stem_pool": str(model.get("stem_pool", "same")),
            "cifar_stem": bool(model.get("cifar_stem", False)),
            "feature_dim": stem * 8 * (4 if bottleneck else 1)}


def resnet_state(variables: Mapping) -> dict[str, np.ndarray]:
    """torchvision state_dict of our ResNet's {'params', 'batch_stats'} (BatchNorm counters at 0)."""
    state = invert({k: variables[k] for k in ("params", "batch_stats")}, convert.torchvision_source,
                   target="torchvision ResNet")
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def torchvision_resnet(spec: dict):
    """torchvision's ResNet laid out like a medssl_jax ResNet export (its `torchvision.json`): the export's
    input channels, widths and stem pool, and a projection shortcut in every stage's first block."""
    import torch.nn as nn
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    block = Bottleneck if spec["bottleneck"] else BasicBlock
    model = torchvision.models.resnet.ResNet(block, spec["blocks_per_stage"])
    width = spec["stem_width"]
    kernel, stride = (3, 1) if spec.get("cifar_stem") else (7, 2)  # SimCLR's small-image stem: 3x3/1, no pool
    model.conv1 = nn.Conv2d(spec["in_chans"], width, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    if spec.get("cifar_stem"):
        model.maxpool = nn.Identity()
    elif spec["stem_pool"] == "same":  # TF 'SAME' padding (0, 1): exact when image sides are divisible by 4
        model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    model.inplanes = width
    for stage, blocks in enumerate(spec["blocks_per_stage"]):
        layer = model._make_layer(block, width * 2**stage, blocks, stride=1 if stage == 0 else 2)
        if layer[0].downsample is None:  # SimCLR projects the shortcut of every stage's first block
            planes = width * block.expansion
            layer[0].downsample = nn.Sequential(nn.Conv2d(planes, planes, kernel_size=1, bias=False),
                                                nn.BatchNorm2d(planes))
        setattr(model, f"layer{stage + 1}", layer)
    model.fc = nn.Identity()  # model(x) returns the pooled features
    return model


# --------------------------------------------------------------------------------------------------- ViT


def _vit_arch(model: Mapping) -> dict:
    from medssl_jax import models

    encoder = models.build_encoder({**model, "dtype": "float32"})
    if encoder.position != "learned":
        raise ExportError(f"position={encoder.position!r} (DINOv3's rotary embeddings) has no slot in the timm / "
                          "transformers Dinov2 layouts, which hold a learned position table")
    return {**encoder.arch(), "image_size": encoder.image_size, "num_registers": encoder.num_registers,
            "layerscale_init": encoder.layerscale_init, "ln_eps": encoder.ln_eps, "qkv_bias": encoder.qkv_bias,
            "gelu_approximate": encoder.gelu_approximate, "pool": encoder.pool}


def timm_spec(model: Mapping, channels: int) -> dict:
    """timm.create_model's name and keyword arguments for our ViT (img_size = its position-embedding grid)."""
    arch = _vit_arch(model)
    if arch["ffn"] != "mlp":
        raise ExportError("block_0/mlp/w12 (SwiGLU) has no slot in the timm layout built from keyword arguments; "
                          "export with --format=hf")
    if arch["pool"] == "token+gap":
        raise ExportError("pool='token+gap' has no timm global_pool (timm pools 'token' or 'avg'); "
                          "export with --format=hf and concatenate the two from last_hidden_state")
    if arch["gelu_approximate"] or arch["ln_eps"] != 1e-6:
        raise ExportError("a ViT with tanh GELU or LayerNorm eps != 1e-6 has no timm keyword for it; use --format=hf")
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(arch["width"], "base")
    kwargs = {
        "pretrained": False, "num_classes": 0, "img_size": arch["image_size"], "patch_size": arch["patch_size"],
        "in_chans": int(channels), "embed_dim": arch["width"], "depth": arch["depth"],
        "num_heads": arch["num_heads"], "mlp_ratio": arch["mlp_dim"] / arch["width"], "qkv_bias": arch["qkv_bias"],
        "class_token": True, "reg_tokens": arch["num_registers"], "no_embed_class": False,
        "global_pool": "token" if arch["pool"] == "token" else "avg", "fc_norm": False,
        "init_values": 1.0 if arch["layerscale_init"] is not None else None, "dynamic_img_size": False,
    }
    return {"model_name": f"vit_{size}_patch16_224", "kwargs": kwargs}


def timm_state(variables: Mapping, model: Mapping) -> dict[str, np.ndarray]:
    state = invert(variables["params"], convert.dinov2_source, target="timm VisionTransformer")
    registers = state.pop("register_tokens", None)
    if registers is not None:  # timm adds a position row to every prefix token: zero for the registers
        state["reg_token"] = registers
        pos = state["pos_embed"]
        state["pos_embed"] = np.concatenate([pos[:, :1], np.zeros((1, registers.shape[1], pos.shape[2]), np.float32),
                                             pos[:, 1:]], axis=1)
    return state


# ---------------------------------------------------------------------------------------------- ConvNeXt


def timm_convnext_spec(model: Mapping, channels: int) -> dict:
    """timm.create_model's name and keyword arguments for our ConvNeXt (timm's layout is ConvNeXt's own:
    the same blocks, and head.norm on the pooled map, i.e. our 'cls' feature)."""
    from medssl_jax import models

    encoder = models.build_encoder({**model, "dtype": "float32"})
    depths, dims = encoder.arch()
    name = next((f"convnext_{size}" for size, v in convnext.SIZES.items()
                 if tuple(v["depths"]) == depths and tuple(v["dims"]) == dims), "convnext_tiny")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": int(channels), "depths": list(depths),
              "dims": list(dims), "ls_init_value": encoder.layerscale_init, "norm_eps": encoder.ln_eps}
    return {"model_name": name, "kwargs": kwargs}


def timm_convnext_state(variables: Mapping) -> dict[str, np.ndarray]:
    return invert(variables["params"], functools.partial(convert.convnext_source, layout="timm"),
                  target="timm ConvNeXt")


def hf_config(model: Mapping, channels: int) -> dict:
    arch = _vit_arch(model)
    if arch["mlp_dim"] % arch["width"]:
        raise ExportError(f"block_0/mlp: hidden size {arch['mlp_dim']} is not a whole multiple of the width "
                          f"{arch['width']}, and transformers' Dinov2Config takes an integer mlp_ratio")
    registers = arch["num_registers"]
    config = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "hidden_size": arch["width"], "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
        "mlp_ratio": arch["mlp_dim"] // arch["width"], "hidden_act": "gelu_pytorch_tanh" if arch["gelu_approximate"]
        else "gelu", "layer_norm_eps": arch["ln_eps"], "image_size": arch["image_size"],
        "patch_size": arch["patch_size"], "num_channels": int(channels), "qkv_bias": arch["qkv_bias"],
        "layerscale_value": 1.0, "use_swiglu_ffn": arch["ffn"] == "swiglu", "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    return config


def hf_state(variables: Mapping, model: Mapping) -> dict[str, np.ndarray]:
    arch = _vit_arch(model)
    state = invert(variables["params"], convert.hf_dinov2_source, target="transformers Dinov2Model")
    width = arch["width"]
    state["embeddings.mask_token"] = np.zeros((1, width), np.float32)  # used only with bool_masked_pos
    if arch["layerscale_init"] is None:  # x * 1 is x: the same function as no LayerScale
        for i in range(arch["depth"]):
            for k in (1, 2):
                state[f"encoder.layer.{i}.layer_scale{k}.lambda1"] = np.ones((width,), np.float32)
    return state


def hf_preprocessor(normalization: Mapping | None, image_size: int, channels: int) -> dict:
    """preprocessor_config.json: resize + centre crop to the export's size, pixels / 255, its mean / std
    (0 / 1 for our own pretraining, which feeds pixels in [0, 1])."""
    mean = list(normalization["mean"]) if normalization else [0.0] * channels
    std = list(normalization["std"]) if normalization else [1.0] * channels
    return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
            "image_std": std, "do_convert_rgb": channels == 3}


def hf_features(last_hidden_state, *, pool: str, num_registers: int):
    """Our ViT's features from a transformers Dinov2Model's last_hidden_state (CLS, registers, patches)."""
    cls = last_hidden_state[:, 0]
    if pool == "token":
        return cls
    patches = last_hidden_state[:, 1 + num_registers:].mean(1)
    if pool == "gap":
        return patches
    import torch

    return torch.cat([cls, patches], dim=-1)


# ------------------------------------------------------------------------------------------ round trip


def check_round_trip(fmt: str, state: dict, variables: Mapping, model: Mapping, *, extra: Mapping) -> None:
    """Imports `state` back with medssl_jax.models.convert (the architecture given) and requires every
    variable bit for bit: what PyTorch loads is exactly what we trained."""
    arch = {k: v for k, v in model.items() if k not in ("name", "input_mean", "input_std")}
    try:
        if fmt == "torchvision":
            back, _ = convert.torchvision_resnet_to_flax(state, arch=arch, what="the export")
        elif fmt == "timm" and model.get("name") == "convnext":
            back, _ = convert.dinov3_convnext_to_flax(state, layout="timm", arch=arch, what="the export")
        elif fmt == "timm":
            back, _ = convert.timm_to_flax(state, arch=arch, num_heads=extra.get("num_heads"), what="the export")
        else:
            back, _ = convert.hf_dinov2_to_flax(state, extra, arch=arch, what="the export")
    except convert.ConvertError as error:
        raise ExportError(f"{fmt} export does not import back: {error}") from None
    ours = dict(_leaves({k: variables[k] for k in back}))
    theirs = dict(_leaves(back))
    if set(ours) != set(theirs):
        raise ExportError(f"{fmt} export imports back with other variables: "
                          f"{sorted('/'.join(n) for n in set(ours) ^ set(theirs))[:5]}")
    for names, leaf in ours.items():
        if not np.array_equal(leaf, theirs[names]):
            raise ExportError(f"{fmt} export: {'/'.join(names)} does not import back bit for bit")
