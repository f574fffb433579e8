"""Weight import: reference PyTorch models with random weights -> save -> convert -> same features in Flax.

The DINOv2 and timm references are small re-implementations with the official module/parameter names
(facebookresearch/dinov2 `vision_transformer.py`: patch_embed.proj, cls_token, pos_embed, register_tokens,
blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 or mlp.w12/w3, ls2.gamma}, norm); the
.npz is written in the augreg layout that timm's `_load_weights` reads; transformers' own Dinov2Model is
used as is; the torchvision ResNet-50 layout (conv1, bn1, layerS.B.convK/bnK, downsample.0/1, fc) comes
from a small hand-written torch ResNet. Tiny sizes keep this CPU-only test fast.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from medssl_jax import checkpoint, models  # noqa: E402
from medssl_jax import convert as convert_cli  # noqa: E402
from medssl_jax.models import convert  # noqa: E402

WIDTH, HEADS = 32, 4


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "bn1.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return module.eval()


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------------ torch reference: DINOv2 / timm ViT


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefSwiGLU(nn.Module):  # dinov2 SwiGLUFFNFused
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RefLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class RefBlock(nn.Module):
    def __init__(self, dim, heads, swiglu, layerscale):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.ls1 = RefLayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefSwiGLU(dim, 4 * dim) if swiglu else RefMlp(dim, 4 * dim)
        self.ls2 = RefLayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefViT(nn.Module):
    """DinoVisionTransformer's forward_features (returns the normed token sequence)."""

    def __init__(self, *, patch, img_size, depth=2, registers=0, swiglu=False, layerscale=True,
                 interpolate_offset=0.1, interpolate_antialias=False):
        super().__init__()
        self.patch, self.offset, self.antialias = patch, interpolate_offset, interpolate_antialias
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, WIDTH, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, WIDTH))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, WIDTH)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, WIDTH))
        self.blocks = nn.ModuleList(RefBlock(WIDTH, HEADS, swiglu, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):  # dinov2 b8931f7 semantics ("w" = dim 2 of NCHW)
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        w0, h0, m = w // self.patch, h // self.patch, int(math.sqrt(n))
        kwargs = ({"scale_factor": (float(w0 + self.offset) / m, float(h0 + self.offset) / m)} if self.offset
                  else {"size": (w0, h0)})
        grid = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                             antialias=self.antialias, **kwargs)
        assert (w0, h0) == grid.shape[-2:]
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)], dim=1)

    def forward(self, x):
        _, _, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _flax_features(export_dir, images_nhwc):
    """The converted encoder on exactly these pixels: its recorded input normalisation (tested below) is
    switched off, so the references see the same inputs."""
    variables, config = checkpoint.load_export(export_dir)
    model = models.build_encoder({**config["model"], "dtype": "float32", "input_mean": (), "input_std": ()})
    _, out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(images_nhwc))
    return out, config


def _images(b, h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _compare_tokens(out, ref_tokens, registers):
    errs = {"cls": _rel_err(out["cls"], ref_tokens[:, 0]),
            "patch": _rel_err(out["patch_tokens"], ref_tokens[:, 1 + registers:])}
    if registers:
        errs["reg"] = _rel_err(out["register_tokens"], ref_tokens[:, 1:1 + registers])
    print("max relative error", errs)  # shown with pytest -s
    assert max(errs.values()) < 1e-4, errs
    return errs


def _run_cli(argv):
    assert convert_cli.main(argv) == 0


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2_hub_state_dict(tmp_path, registers):
    # Hub models without registers interpolate with scale factor (+0.1); the _reg models with size + antialias.
    ref = _randomize(RefViT(patch=14, img_size=56, registers=registers, swiglu=registers > 0,
                            interpolate_offset=0.0 if registers else 0.1,
                            interpolate_antialias=registers > 0), seed=registers)
    torch.save(ref.state_dict(), tmp_path / "dinov2.pth")
    _run_cli(["--format=dinov2", f"--input={tmp_path / 'dinov2.pth'}", f"--output={tmp_path / 'out'}",
              f"--num_heads={HEADS}"])
    for hw in [(42, 28), (56, 56)]:  # resampled non-square grid; native grid (stored pos-embed as is)
        x = _images(2, *hw, seed=hw[0])
        with torch.no_grad():
            want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        out, config = _flax_features(tmp_path / "out", x)
        _compare_tokens(out, want, registers)
    model = config["model"]
    assert (model["num_registers"], model["image_size"], model["patch_size"]) == (registers, 56, 14)
    assert model["pos_interp"] == ("size_aa" if registers else "dinov2")
    assert model["ffn"] == ("swiglu" if registers else "mlp")
    assert config["source"]["format"] == "dinov2" and len(config["source"]["sha256"]) == 64


def _hf_model(tmp_path, registers):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, patch_size=14,
                  image_size=56, layerscale_value=0.5)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        config = transformers.Dinov2Config(use_swiglu_ffn=True, **kwargs)
        model = transformers.Dinov2Model(config)
    model = _randomize(model, seed=10 + registers)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


@pytest.mark.parametrize("registers", [0, 3])
def test_hf_dinov2_directory(tmp_path, registers):
    ref = _hf_model(tmp_path, registers)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    _run_cli(["--format=hf-dinov2", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}"])
    x = _images(2, 28, 42, seed=3)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    out, config = _flax_features(tmp_path / "out", x)
    _compare_tokens(out, want, registers)
    assert config["model"]["pos_interp"] == ("size_aa" if registers else "size")


def _hf_dinov3_model(tmp_path, *, gated, registers):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("transformers < 4.56 has no DINOv3ViTModel")
    config = transformers.DINOv3ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=16, image_size=64,
        intermediate_size=64 if gated else 192, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        num_register_tokens=registers)  # DINOv3's key projection has no bias (key_bias=False)
    model = _randomize(transformers.DINOv3ViTModel(config), seed=20 + registers)
    model.save_pretrained(tmp_path / "hf3", safe_serialization=True)
    return model


@pytest.mark.parametrize("gated,registers", [(False, 0), (True, 4)], ids=["mlp", "swiglu-reg4"])
def test_hf_dinov3_directory_rope_equals_transformers_at_native_and_other_sizes(tmp_path, gated, registers):
    """RoPE positions (no table to resample): CLS, register and patch tokens equal transformers'
    DINOv3ViTModel at its own 64 px and at 80 x 48 px."""
    ref = _hf_dinov3_model(tmp_path, gated=gated, registers=registers)
    _run_cli(["--format=hf-dinov3", f"--input={tmp_path / 'hf3'}", f"--output={tmp_path / 'out'}"])
    for h, w in ((64, 64), (80, 48)):
        x = _images(2, h, w, seed=5)
        with torch.no_grad():
            want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        out, config = _flax_features(tmp_path / "out", x)
        assert max(_compare_tokens(out, want, registers).values()) < 1e-5
    model = config["model"]
    assert model["position"] == "rope" and model["ffn"] == ("swiglu" if gated else "mlp")
    assert "pos_embed" not in checkpoint.load_export(str(tmp_path / "out"))[0]["params"]


def _dinov3_hub_state(hf_model, registers):
    """The facebookresearch/dinov3 hub state_dict of the same weights (names from its vision_transformer.py,
    layers/attention.py, ffn_layers.py, rope_position_encoding.py): fused qkv with a random key bias that
    the stored bias_mask zeroes, storage_tokens, w1/w2/w3 SwiGLU, ls*.gamma, rope_embed.periods."""
    hf = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    hub = {"cls_token": hf["embeddings.cls_token"], "mask_token": hf["embeddings.mask_token"][0],
           "storage_tokens": hf["embeddings.register_tokens"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
           "norm.weight": hf["norm.weight"], "norm.bias": hf["norm.bias"]}
    width = hf["norm.weight"].shape[0]
    head_dim = width // hf_model.config.num_attention_heads
    hub["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    for i in range(hf_model.config.num_hidden_layers):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        src = src if src + "norm1.weight" in hf else f"layer.{i}."
        att = src + "attention."
        hub[dst + "attn.qkv.weight"] = torch.cat([hf[att + f"{n}_proj.weight"] for n in "qkv"])
        hub[dst + "attn.qkv.bias"] = torch.cat([hf[att + "q_proj.bias"], torch.randn(width), hf[att + "v_proj.bias"]])
        hub[dst + "attn.qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
        hub[dst + "attn.proj.weight"], hub[dst + "attn.proj.bias"] = hf[att + "o_proj.weight"], hf[att + "o_proj.bias"]
        for k in (1, 2):
            hub[dst + f"ls{k}.gamma"] = hf[src + f"layer_scale{k}.lambda1"]
            hub[dst + f"norm{k}.weight"], hub[dst + f"norm{k}.bias"] = hf[src + f"norm{k}.weight"], hf[src + f"norm{k}.bias"]
        names = ({"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if hf_model.config.use_gated_mlp
                 else {"up_proj": "fc1", "down_proj": "fc2"})
        for theirs, ours in names.items():
            for leaf in ("weight", "bias"):
                hub[dst + f"mlp.{ours}.{leaf}"] = hf[src + f"mlp.{theirs}.{leaf}"]
    return hub


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_dinov3_hub_state_dict_equals_transformers(tmp_path, gated):
    ref = _hf_dinov3_model(tmp_path, gated=gated, registers=4)
    torch.save(_dinov3_hub_state(ref, 4), tmp_path / "dinov3_vits16_pretrain_lvd1689m-test.pth")
    _run_cli(["--format=dinov3", f"--input={tmp_path / 'dinov3_vits16_pretrain_lvd1689m-test.pth'}",
              f"--output={tmp_path / 'out'}", "--num_heads=3"])
    x = _images(2, 48, 80, seed=6)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    out, config = _flax_features(tmp_path / "out", x)
    assert max(_compare_tokens(out, want, 4).values()) < 1e-5
    assert config["model"]["rope_theta"] == pytest.approx(100.0) and config["model"]["ln_eps"] == 1e-5


def _hf_dinov3_convnext(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ConvNextModel"):
        pytest.skip("transformers < 4.56 has no DINOv3ConvNextModel")
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
    model = _randomize(transformers.DINOv3ConvNextModel(config), seed=30).eval()
    model.save_pretrained(tmp_path / "hf3c", safe_serialization=True)
    return model


def _hub_convnext_state(hf_state):
    """transformers' DINOv3ConvNextModel names -> the dinov3 hub's `models/convnext.py` names."""
    import re as re_

    def rename(key):
        key = re_.sub(r"^stages\.(\d+)\.downsample_layers\.", r"downsample_layers.\1.", key)
        key = re_.sub(r"^stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2.", key)
        for hf, hub in (("depthwise_conv", "dwconv"), ("pointwise_conv", "pwconv"), (".layer_norm.", ".norm.")):
            key = key.replace(hf, hub)
        return re_.sub(r"^layer_norm\.", "norm.", key)

    return {rename(k): torch.as_tensor(v) for k, v in hf_state.items()}


def test_dinov3_convnext_from_transformers_and_hub_layouts_equals_transformers(tmp_path):
    """DINOv3's ConvNeXt (transformers' DINOv3ConvNextModel directory, and the hub .pth layout of the same
    weights): the pooled-and-normed CLS token and the patch tokens equal transformers' at 64 px and at a
    non-square 96 x 64 px; every tensor is used."""
    from safetensors.numpy import load_file

    ref = _hf_dinov3_convnext(tmp_path)
    _run_cli(["--format=hf-dinov3", f"--input={tmp_path / 'hf3c'}", f"--output={tmp_path / 'out_hf'}"])
    torch.save(_hub_convnext_state(load_file(str(tmp_path / "hf3c" / "model.safetensors"))),
               tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m.pth")
    _run_cli(["--format=dinov3", f"--input={tmp_path / 'dinov3_convnext_tiny_pretrain_lvd1689m.pth'}",
              f"--output={tmp_path / 'out_hub'}"])
    for h, w in ((64, 64), (96, 64)):
        x = _images(2, h, w, seed=h)
        with torch.no_grad():
            want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        for out_dir in ("out_hf", "out_hub"):
            out, config = _flax_features(tmp_path / out_dir, x)
            errs = {"cls": _rel_err(out["cls"], want[:, 0]), "patch": _rel_err(out["patch_tokens"], want[:, 1:])}
            assert max(errs.values()) < 1e-5, (out_dir, errs)
    assert config["model"]["name"] == "convnext" and config["model"]["depths"] == [1, 1, 2, 1]
    assert config["model"]["dims"] == [8, 16, 24, 32] and config["model"]["layerscale_init"] == 1e-6
    assert config["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]


def test_dinov3_convnext_that_does_not_fit_fails_in_one_line(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_dinov3_convnext(tmp_path)
    weights = tmp_path / "hf3c" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("stages.2.layers.1.pointwise_conv2.weight")
    state["stages.0.layers.0.depthwise_conv.weight"] = np.zeros((8, 1, 5, 5), np.float32)
    save_file(state, str(weights))
    with pytest.raises(convert.ConvertError) as error:
        convert.convert("hf-dinov3", str(tmp_path / "hf3c"))
    message = str(error.value)
    assert "\n" not in message and "missing ['stages.2.layers.1.pointwise_conv2.weight']" in message
    assert "mis-shaped" in message and "stages.0.layers.0.depthwise_conv.weight" in message


def test_hf_dinov3_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_dinov3_model(tmp_path, gated=False, registers=0)
    weights = tmp_path / "hf3" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("layer.1.mlp.down_proj.weight")
    state["layer.0.attention.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(state, str(weights))
    with pytest.raises(convert.ConvertError) as error:
        convert.convert("hf-dinov3", str(tmp_path / "hf3"))
    message = str(error.value)
    assert "\n" not in message and "missing ['layer.1.mlp.down_proj.weight']" in message
    assert "unexpected ['layer.0.attention.extra.weight']" in message


def test_converted_encoders_record_their_input_normalization_and_evaluation_applies_it(tmp_path):
    from medssl_jax.evaluate import encoders, linear_probe
    from medssl_jax.models.input_norm import IMAGENET_MEAN, IMAGENET_STD

    # A transformers directory with RAD-DINO's kind of preprocessor (its own mean/std, 518 px crops).
    ref = _hf_model(tmp_path, 0)
    mean, std = [0.5307, 0.5307, 0.5307], [0.2583, 0.2583, 0.2583]
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": mean, "image_std": std, "crop_size": {"height": 518, "width": 518}}))
    _run_cli(["--format=hf-dinov2", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}"])
    _, config = checkpoint.load_export(str(tmp_path / "out"))
    assert config["input"]["normalization"]["mean"] == mean and config["input"]["image_size"] == 518
    assert config["model"]["input_mean"] == mean and config["model"]["input_std"] == std
    x = np.random.default_rng(4).uniform(size=(2, 56, 56, 3)).astype(np.float32)  # pixels in [0, 1]
    cfg = linear_probe.reference_config()
    cfg.update(init=str(tmp_path / "out"), image_size=56)
    for choice, pixels in (("auto", (x - np.float32(mean)) / np.float32(std)), ("none", x)):
        cfg.input_normalization = choice
        encoder = encoders.load_encoder(cfg, channels=3)
        _, out = jax.jit(lambda v, im: encoder.model.apply(v, im))(encoder.variables, jnp.asarray(x))
        with torch.no_grad():
            want = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        _compare_tokens(out, want, 0)
    # The other formats record their training transforms.
    assert convert.input_normalization("dinov2", "x.pth")[:2] == (IMAGENET_MEAN, IMAGENET_STD)
    assert convert.input_normalization("torchvision-resnet", "x.pth")[:2] == (IMAGENET_MEAN, IMAGENET_STD)
    assert convert.input_normalization("timm-npz", "x.npz")[:2] == ((0.5,) * 3, (0.5,) * 3)


def test_rad_dino_config_converts_with_its_preprocessor(tmp_path):
    # microsoft/rad-dino is a transformers Dinov2Model: ViT-B/14 (768 wide, 12 blocks, 12 heads), 518 px,
    # LayerScale, plain MLP; random weights at exactly those shapes, its kind of preprocessor beside them.
    import json

    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                          patch_size=14, image_size=518, layerscale_value=1.0, use_swiglu_ffn=False,
                                          qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
    ref = transformers.Dinov2Model(hf_config).eval()
    ref.save_pretrained(tmp_path / "rad-dino", safe_serialization=True)
    mean, std = [0.5307] * 3, [0.2583] * 3
    (tmp_path / "rad-dino" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "do_normalize": True, "image_mean": mean, "image_std": std,
         "crop_size": {"height": 518, "width": 518}, "size": {"shortest_edge": 518}}))
    _run_cli(["--format=hf-dinov2", f"--input={tmp_path / 'rad-dino'}", f"--output={tmp_path / 'out'}"])
    _, config = checkpoint.load_export(str(tmp_path / "out"))
    model = config["model"]
    assert (model["width"], model["depth"], model["num_heads"], model["patch_size"], model["image_size"]) == (
        768, 12, 12, 14, 518)
    assert model["input_mean"] == mean and config["input"]["image_size"] == 518
    x = np.random.default_rng(8).uniform(size=(1, 56, 56, 3)).astype(np.float32)  # 37x37 grid -> 4x4
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(((x - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2)))
    variables, _ = checkpoint.load_export(str(tmp_path / "out"))
    encoder = models.build_encoder({**model, "dtype": "float32"})  # normalises [0, 1] pixels itself
    _, out = jax.jit(lambda v, im: encoder.apply(v, im))(variables, jnp.asarray(x))
    _compare_tokens(out, want.last_hidden_state.numpy(), 0)


def _augreg_npz(ref: RefViT, path, *, stacked=False):
    """The original JAX ViT layout (what timm's _load_weights reads), written from the torch weights."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    d, h = WIDTH, HEADS
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": np.zeros((d, 7), np.float32), "head/bias": np.zeros(7, np.float32)}
    blocks = []
    for i in range(len(ref.blocks)):
        p = f"blocks.{i}."
        qw, kw, vw = np.split(sd[p + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[p + "attn.qkv.bias"], 3)
        blk = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
               "LayerNorm_2/scale": sd[p + "norm2.weight"], "LayerNorm_2/bias": sd[p + "norm2.bias"],
               "MultiHeadDotProductAttention_1/out/kernel": sd[p + "attn.proj.weight"].reshape(d, h, -1).transpose(1, 2, 0),
               "MultiHeadDotProductAttention_1/out/bias": sd[p + "attn.proj.bias"],
               "MlpBlock_3/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T, "MlpBlock_3/Dense_0/bias": sd[p + "mlp.fc1.bias"],
               "MlpBlock_3/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T, "MlpBlock_3/Dense_1/bias": sd[p + "mlp.fc2.bias"]}
        for name, wt, bs in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            blk[f"MultiHeadDotProductAttention_1/{name}/kernel"] = wt.T.reshape(d, h, -1)
            blk[f"MultiHeadDotProductAttention_1/{name}/bias"] = bs.reshape(h, -1)
        blocks.append(blk)
    for key in blocks[0]:
        if stacked:
            w[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
        else:
            w.update({f"Transformer/encoderblock_{i}/{key}": b[key] for i, b in enumerate(blocks)})
    np.savez(path, **w)


def test_timm_augreg_npz(tmp_path):
    ref = _randomize(RefViT(patch=16, img_size=64, layerscale=False), seed=20)  # timm ViT: no LayerScale
    _augreg_npz(ref, tmp_path / "augreg.npz")
    _augreg_npz(ref, tmp_path / "scanned.npz", stacked=True)
    _run_cli(["--format=timm-npz", f"--input={tmp_path / 'augreg.npz'}", f"--output={tmp_path / 'out'}"])
    x = _images(2, 64, 64, seed=4)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    out, config = _flax_features(tmp_path / "out", x)
    _compare_tokens(out, want, 0)
    assert config["model"]["num_heads"] == HEADS and config["model"]["layerscale_init"] is None
    flat, _ = convert.convert("timm-npz", str(tmp_path / "augreg.npz"))
    scanned, _ = convert.convert("timm-npz", str(tmp_path / "scanned.npz"))
    jax.tree.map(np.testing.assert_array_equal, flat, scanned)


# ------------------------------------------------------------------------------ torchvision ResNet-50


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefResNet50(nn.Module):
    """torchvision.models.resnet50's layout and forward (v1.5: stride on the 3x3), with a base width."""

    def __init__(self, base=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base
        for i, blocks in enumerate((3, 4, 6, 3)):
            layer = []
            for j in range(blocks):
                layer.append(RefBottleneck(inplanes, base * 2**i, 2 if i > 0 and j == 0 else 1))
                inplanes = 4 * base * 2**i
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(inplanes, 10)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3))


def test_torchvision_resnet50(tmp_path):
    ref = _randomize(RefResNet50(base=8), seed=30)
    torch.save(ref.state_dict(), tmp_path / "resnet50.pth")
    _run_cli(["--format=torchvision-resnet", f"--input={tmp_path / 'resnet50.pth'}", f"--output={tmp_path / 'out'}"])
    # 32 px: the stem output (16) is even, as at 224 px, where SimCLR's SAME pool would pad (0, 1);
    # the export selects stem_pool='torch' (padding 1 on both sides) to match torchvision exactly.
    x = _images(2, 32, 32, seed=5)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    variables, config = checkpoint.load_export(tmp_path / "out")
    assert set(variables) == {"params", "batch_stats"}
    assert {k: config["model"][k] for k in ("name", "depth", "width", "base_width", "stem_pool")} == {
        "name": "resnet", "depth": 50, "width": 1, "base_width": 8, "stem_pool": "torch"}
    model = models.build_encoder({**config["model"], "dtype": "float32", "input_mean": (), "input_std": ()})
    features, _ = model.apply(variables, jnp.asarray(x), train=False)
    print("max relative error", _rel_err(features, want))  # shown with pytest -s
    assert _rel_err(features, want) < 1e-4
    # As the probe loads it for a grey store: the grey image is replicated to RGB and normalised with
    # ImageNet's mean/std inside the encoder, so the RGB stem is used as it is (no summing) and exactly.
    from medssl_jax.evaluate import encoders, linear_probe
    from medssl_jax.models.input_norm import IMAGENET_MEAN, IMAGENET_STD

    cfg = linear_probe.reference_config()
    cfg.update(init=str(tmp_path / "out"), image_size=32)
    encoder = encoders.load_encoder(cfg, channels=1)
    grey = np.random.default_rng(6).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    features, _ = encoder.model.apply(encoder.variables, jnp.asarray(grey), train=False)
    rgb = (np.repeat(grey, 3, -1) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    with torch.no_grad():
        want = ref(torch.from_numpy(rgb.transpose(0, 3, 1, 2))).numpy()
    assert encoder.variables["params"]["stem"]["conv"]["kernel"].shape[2] == 3
    assert _rel_err(features, want) < 1e-4


# ------------------------------------------------------------------------------------ options and errors


def test_in_chans_1_sums_the_patch_kernel(tmp_path):
    ref = _randomize(RefViT(patch=14, img_size=28, depth=1), seed=40)
    torch.save(ref.state_dict(), tmp_path / "d.pth")
    rgb, _ = convert.convert("dinov2", str(tmp_path / "d.pth"), num_heads=HEADS)
    grey, config = convert.convert("dinov2", str(tmp_path / "d.pth"), num_heads=HEADS, in_chans=1)
    assert grey["params"]["patch_embed"]["kernel"].shape == (14, 14, 1, WIDTH)
    assert len(config["model"]["input_mean"]) == 1 and "approximate" in config["input"]["normalization"]["from"]
    model = models.build_encoder({**config["model"], "dtype": "float32", "input_mean": (), "input_std": ()})
    x = _images(1, 28, 28)[..., :1]
    f_grey = model.apply(grey, jnp.asarray(x))[0]
    f_rgb = model.clone(in_chans=3).apply(rgb, jnp.asarray(np.repeat(x, 3, -1)))[0]
    np.testing.assert_allclose(f_grey, f_rgb, rtol=1e-5, atol=1e-5)


def test_wrong_architecture_lists_missing_unexpected_misshaped(tmp_path):
    ref = _randomize(RefViT(patch=14, img_size=28, depth=2), seed=50)
    sd = ref.state_dict()
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    del sd["blocks.0.attn.proj.bias"]
    torch.save(sd, tmp_path / "d.pth")
    with pytest.raises(convert.ConvertError) as info:
        convert.convert("dinov2", str(tmp_path / "d.pth"), num_heads=HEADS)
    message = str(info.value)
    assert "\n" not in message and "d.pth does not fit vit" in message
    assert "missing ['blocks.0.attn.proj.bias']" in message and "unexpected ['blocks.1.extra.weight']" in message
    # A chosen architecture (ViT-S/14 here) that the checkpoint does not fit: mis-shaped + missing blocks.
    torch.save(ref.state_dict(), tmp_path / "ok.pth")
    with pytest.raises(convert.ConvertError, match=r"as chosen.*missing \['blocks.2.attn.proj.bias'.*mis-shaped \['blocks.0.attn.proj.bias gives"):
        convert.convert("dinov2", str(tmp_path / "ok.pth"), arch={"variant": "S/14"})
    with pytest.raises(convert.ConvertError, match="cannot infer the head count of width 32"):
        convert.convert("dinov2", str(tmp_path / "ok.pth"))
    with pytest.raises(convert.ConvertError, match="not this format"):
        convert.convert("torchvision-resnet", str(tmp_path / "ok.pth"))


class _NotWeights:
    pass


def test_loading_refuses_pickled_code_and_reports_cli_errors(tmp_path, capsys):
    torch.save({"x": _NotWeights()}, tmp_path / "evil.pth")
    with pytest.raises(convert.ConvertError, match="not a loadable weights-only PyTorch state_dict"):
        convert.read_torch_state_dict(str(tmp_path / "evil.pth"))
    with pytest.raises(convert.ConvertError, match="no such file"):
        convert.convert("timm-npz", str(tmp_path / "absent.npz"))
    assert convert_cli.main(["--format=dinov2", f"--input={tmp_path / 'evil.pth'}",
                             f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert: error: ") and "evil.pth: not a loadable" in err and "\n" not in err
    assert "refused instead of running its code" in err
    assert not os.path.exists(tmp_path / "out" / "config.json")
    os.makedirs(tmp_path / "out")
    json.dump({}, open(tmp_path / "out" / "config.json", "w"))
    assert convert_cli.main(["--format=dinov2", f"--input={tmp_path / 'evil.pth'}",
                             f"--output={tmp_path / 'out'}"]) == 2
    assert "already holds an export" in capsys.readouterr().err


def test_a_pth_given_as_timm_npz_is_one_line(tmp_path, capsys):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.pth")
    assert convert_cli.main(["--format=timm-npz", f"--input={tmp_path / 'model.pth'}",
                             f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a .npz of arrays" in err and "PyTorch checkpoint" in err


# ------------------------------------------------------------------- continued pretraining (configs/dino.py)


def test_continued_dino_pretraining_from_a_converted_dinov3_starts_from_it_trains_resumes_and_exports(tmp_path):
    """RAD-DINO's recipe on a converted checkpoint: `configs/dino.py:runlocal,init=EXPORT,fsdp=8` takes the
    model from the export, student and teacher start from its weights (bit for bit while the backbone is
    frozen for the heads' warm-up, so the step-0 features are the converted model's), then the backbone
    trains, sharded over 8 devices; an interrupted run resumes to the same state, and the export reloads
    with the source's model fields."""
    from helpers import final_state, set_fields

    from medssl_jax import config_lib, train
    from medssl_jax.data import phantoms

    _hf_dinov3_model(tmp_path, gated=True, registers=4)  # RoPE, 4 registers, LayerScale, SwiGLU
    source = str(tmp_path / "converted")
    _run_cli(["--format=hf-dinov3", f"--input={tmp_path / 'hf3'}", f"--output={source}"])
    converted, source_config = checkpoint.load_export(source)
    cache = str(tmp_path / "phantoms")
    phantoms.ensure_phantom_store(cache, num_patients=64, image_size=32, seed=0)
    # fsdp=8: parameters, optimiser moments and the teacher sharded over the 8 fake devices (the ViT-L recipe).
    config = config_lib.load_config("dino", f"runlocal,init={source},fsdp=8")
    assert config.init == source and config.mesh == (("data", -1), ("fsdp", 8)) and config.model.remat
    assert config.model.rope_rescale == 2.0  # DINOv3's training-time RoPE augmentation, off in the export
    assert {k: config.model[k] for k in source_config["model"] if k != "remat"} == {
        k: v for k, v in source_config["model"].items() if k != "remat"}
    assert (config.dino.centering, config.dino.koleo_weight, config.optim.layer_decay,
            config.optim.patch_embed_lr_mult) == ("sinkhorn_knopp", 0.1, 0.9, 0.2)
    config = set_fields(config, {
        "data.cache_dir": cache, "data.phantom_patients": 64, "data.phantom_size": 32, "data.image_size": 32,
        "dino.num_local_crops": 2, "dino.local_image_size": 16, "dino.num_prototypes": 16, "dino.hidden_dim": 16,
        "dino.bottleneck_dim": 8, "dino.teacher_temp_warmup_steps": 2, "dino.global1_blur_p": 0.0,
        "dino.global2_blur_p": 0.0, "dino.local_blur_p": 0.0, "dino.global2_solarize_p": 0.0,
        "batch_size": 8, "total_steps": 4, "optim.frozen_encoder_steps": 2, "optim.warmup_steps": 1,
        "checkpoint_every": 1, "log_every": 1, "probe.enabled": False, "monitor.every": 0,
        "dino.ibot_weight": 1.0})  # the full recipe's iBOT term (the :runlocal one leaves it off)
    straight = train.pretrain(config, str(tmp_path / "straight"))
    logged = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert any(row.get("dino/ibot", 0) > 0 for row in logged)  # iBOT's masked-patch term is in the loss
    interrupted = str(tmp_path / "interrupted")
    assert train.pretrain(config, interrupted, stop_after=2).steps_done == 2

    # Step 2, the end of the heads' warm-up: the student's backbone is the converted weights bit for bit, the
    # teacher's (m t + (1 - m) s of two equal values) to float rounding.
    _, early = final_state(interrupted)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, early["params"]["encoder"]),
                 converted["params"])
    jax.tree.map(lambda t, c: np.testing.assert_allclose(t, c, rtol=1e-6, atol=1e-7),
                 jax.tree.map(np.asarray, early["method_state"]["teacher"]["encoder"]), converted["params"])
    x = _images(2, 32, 32, seed=7)
    run_encoder = models.build_encoder({**config.model.to_dict(), "dtype": "float32"})
    _, ours = jax.jit(lambda v, im: run_encoder.apply(v, im))({"params": early["params"]["encoder"]}, x)
    source_out, _ = _flax_features(source, (x - np.float32(source_config["model"]["input_mean"]))
                                   / np.float32(source_config["model"]["input_std"]))
    for key in ("cls", "patch_tokens", "register_tokens"):
        np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(source_out[key]), rtol=1e-5, atol=1e-6)

    # Then the backbone trains, and a resumed run ends exactly where the uninterrupted one does.
    assert train.pretrain(config, interrupted).steps_done == 4
    _, a = final_state(str(tmp_path / "straight"))
    _, b = final_state(interrupted)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    moved = [not np.array_equal(np.asarray(t), np.asarray(c)) for t, c in
             zip(jax.tree.leaves(a["params"]["encoder"]), jax.tree.leaves(converted["params"]))]
    assert any(moved)

    # The export (the teacher's backbone) reloads as the source's architecture, with its normalisation.
    exported, export_config = checkpoint.load_export(straight.export_dir)
    assert {k: export_config["model"][k] for k in source_config["model"] if k != "drop_path_rate"} == {
        k: v for k, v in source_config["model"].items() if k != "drop_path_rate"}
    assert export_config["source"]["init"] == source and export_config["model"]["rope_rescale"] is None
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, exported["params"]),
                 jax.tree.map(np.asarray, a["method_state"]["teacher"]["encoder"]))
    out, _ = _flax_features(straight.export_dir, x)
    assert np.all(np.isfinite(np.asarray(out["cls"])))


def test_continued_pretraining_config_takes_the_model_from_the_export_and_shards_a_vit_l(tmp_path):
    from medssl_jax import config_lib

    source = tmp_path / "vitl"
    source.mkdir()
    model = {**models.encoder_fields("vit"), "width": 1024, "depth": 24, "num_heads": 16, "patch_size": 14,
             "image_size": 518, "layerscale_init": 1e-5}
    (source / "config.json").write_text(json.dumps(
        {"format": checkpoint.EXPORT_FORMAT, "version": checkpoint.EXPORT_VERSION, "model": model}))
    config = config_lib.load_config("dino", f"init={source},steps_per_epoch=100")
    assert (config.model.width, config.model.image_size, config.model.drop_path_rate) == (1024, 518, 0.1)
    assert dict(config.mesh) == {"data": -1, "fsdp": 8} and config.model.remat
    assert config.total_steps == 30 * 100 and config.optim.frozen_encoder_steps == 100
    assert config.dino.ibot_weight == 1.0 and config.dino.centering == "sinkhorn_knopp"
    assert config.optim.base_lr == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="is a vit"):
        config_lib.load_config("dino", f"init={source},encoder=resnet")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        config_lib.load_config("dino", f"init={tmp_path / 'missing'}")
