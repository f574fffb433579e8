"""python -m medssl_jax.export: our encoders in torchvision, timm and transformers (safetensors), with the
features equal to ours, the weights importing back bit for bit, and a model card.

Models are the named architectures at test size: ResNet-18 (grey; RGB with the torchvision stem pool; grey with
SimCLR's small-image stem) and
ResNet-50 x2 (bottleneck, width multiplier) at base width 8, ViT-S/16 and ViT-B/14 with 4 registers at
their real widths but depth 2, grey and RGB; weights freshly initialised (zero-gamma BatchNorms, LayerScale 1e-5) and "trained-like" (every parameter and BatchNorm
statistic drawn at random). Trained fine-tuned models and their heads: tests/test_finetune.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torchvision_ops  # noqa: E402
from medssl_jax import checkpoint, models  # noqa: E402
from medssl_jax import export as export_lib  # noqa: E402
from medssl_jax.models import convert, to_torch  # noqa: E402

TOLERANCE = 1e-5  # max |PyTorch - JAX| / max |JAX|, float32 both
RESNETS = {
    "resnet18-grey": ({"name": "resnet", "depth": 18, "width": 1, "base_width": 8}, 1, 28),
    "resnet18-rgb": ({"name": "resnet", "depth": 18, "width": 1, "base_width": 8, "stem_pool": "torch"}, 3, 32),
    "resnet50x2-grey": ({"name": "resnet", "depth": 50, "width": 2, "base_width": 8}, 1, 32),
    # SimCLR's small-image stem (3x3/1, no max-pool): torchvision's conv1 and maxpool replaced alike
    "resnet18-cifar-grey": ({"name": "resnet", "depth": 18, "width": 1, "base_width": 8, "cifar_stem": True}, 1, 28),
}
VITS = {
    "vit-s16-rgb": ({"name": "vit", "variant": "S/16", "depth": 2, "image_size": 32, "pos_interp": "size"}, 3, 32),
    "vit-b14-reg4-grey": ({"name": "vit", "variant": "B/14", "depth": 2, "image_size": 28, "num_registers": 4,
                           "layerscale_init": 1e-5, "in_chans": 1, "pool": "gap", "pos_interp": "size_aa"}, 1, 28),
}


def trained_like(variables, seed=0):
    """Every leaf drawn at random (BatchNorm variances positive): no zero gamma or unit scale hides a
    transposed or swapped tensor."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in flat:
        value = rng.normal(scale=0.2, size=leaf.shape).astype(np.float32)
        leaves.append(np.abs(value) + 0.5 if str(path[-1]).endswith("'var']") else value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def make_export(path, model, channels, size, *, trained, normalization=None):
    encoder = models.build_encoder({**model, "dtype": "float32"})
    variables = jax.device_get(jax.jit(lambda k: encoder.init(k, jnp.zeros((1, size, size, channels)),
                                                              train=False))(jax.random.PRNGKey(0)))
    if trained:
        variables = trained_like(variables)
    config = {"model": model, "input": {"image_size": size, "channels": channels, "normalization": normalization},
              "source": {"method": "simclr", "steps": 7, "store": "phantoms", "split": "train", "num_images": 123}}
    return checkpoint.save_export(str(path), variables, config), variables, config


def images(size, channels, n=3):
    return np.random.default_rng(1).uniform(size=(n, size, size, channels)).astype(np.float32)


def torch_model(out, fmt):
    """The PyTorch model the card's loading code builds, weights loaded with strict=True."""
    from safetensors.torch import load_file

    torchvision_ops.import_torchvision()
    if fmt == "hf":
        transformers = pytest.importorskip("transformers")
        model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        return model.eval()
    with open(os.path.join(out, f"{fmt}.json")) as f:
        spec = json.load(f)
    if fmt == "torchvision":
        model = to_torch.torchvision_resnet(spec)
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(spec["model_name"], **spec["kwargs"])
    model.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
    return model.eval()


def torch_features(model, fmt, x, config):
    with torch.no_grad():
        out = model(torch.from_numpy(export_lib.torch_input(x, config)))
    if fmt == "hf":
        arch = to_torch._vit_arch(config["model"])
        out = to_torch.hf_features(out.last_hidden_state, pool=arch["pool"], num_registers=arch["num_registers"])
    return out.numpy()


def assert_round_trip(out, fmt, variables, model):
    """The export read back by our importer (python -m medssl_jax.convert) equals the original bit for bit."""
    arch = {k: v for k, v in model.items() if k != "name"}
    importer = {"torchvision": "torchvision-resnet", "timm": "timm", "hf": "hf-dinov2"}[fmt]
    back, _ = convert.convert(importer, out, arch=arch)
    ours = jax.tree_util.tree_flatten_with_path({k: variables[k] for k in back})[0]
    theirs = jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


# Every architecture with trained-like weights; the fresh initialisation (zero-gamma residual branches,
# LayerScale 1e-5) once per layout.
@pytest.mark.parametrize("name,trained", [(name, True) for name in RESNETS] + [("resnet18-grey", False)])
def test_resnet_exports_to_torchvision_output_equal(tmp_path, name, trained):
    model, channels, size = RESNETS[name]
    export, variables, config = make_export(tmp_path / "export", model, channels, size, trained=trained)
    out = str(tmp_path / "tv")
    assert export_lib.main([f"--input={export}", "--format=torchvision", f"--output={out}"]) == 0
    x = images(size, channels)
    ours = export_lib.our_features(variables, config, x)
    theirs = torch_features(torch_model(out, "torchvision"), "torchvision", x, config)
    assert export_lib.relative_difference(theirs, ours) <= TOLERANCE
    assert_round_trip(out, "torchvision", variables, model)


@pytest.mark.parametrize("name,trained,fmt", [("vit-s16-rgb", True, "timm"), ("vit-s16-rgb", True, "hf"),
                                              ("vit-b14-reg4-grey", True, "hf"), ("vit-b14-reg4-grey", False, "timm")])
def test_vit_exports_to_timm_and_transformers_output_equal(tmp_path, name, trained, fmt):
    model, channels, size = VITS[name]
    if fmt == "timm" and model.get("pool") == "gap":
        model = {**model, "pool": "token"}  # timm pools 'avg' as well; one pooling per layout keeps this short
    norm = {"mean": [0.5] * channels, "std": [0.25] * channels} if trained else None
    export, variables, config = make_export(tmp_path / "export", model, channels, size, trained=trained,
                                            normalization=norm)
    if norm:  # a recorded normalisation lives in the model config too (the encoder applies it)
        config["model"] = {**model, "input_mean": norm["mean"], "input_std": norm["std"]}
        export, variables, config = make_export(tmp_path / "export2", config["model"], channels, size, trained=True,
                                                normalization=norm)
    out = str(tmp_path / fmt)
    export_lib.export(export, fmt, out)
    x = images(size, channels)
    ours = export_lib.our_features(variables, config, x)
    theirs = torch_features(torch_model(out, fmt), fmt, x, config)
    assert export_lib.relative_difference(theirs, ours) <= TOLERANCE
    assert_round_trip(out, fmt, variables, {k: v for k, v in config["model"].items()
                                            if k not in ("input_mean", "input_std")})
    if fmt == "hf":
        with open(os.path.join(out, "preprocessor_config.json")) as f:
            pre = json.load(f)
        assert pre["image_mean"] == (norm["mean"] if norm else [0.0] * channels)
        assert pre["crop_size"] == {"height": size, "width": size}


def test_convnext_exports_to_timm_output_equal(tmp_path):
    """DINOv3's ConvNeXt (grey input, LayerScale, ImageNet-like normalisation recorded) in timm's ConvNeXt:
    timm's pooled-and-normed features equal ours, the weights import back bit for bit, the card names it."""
    model = {"name": "convnext", "size": "", "depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "in_chans": 1,
             "input_mean": [0.5], "input_std": [0.25]}
    export, variables, config = make_export(tmp_path / "export", model, 1, 64, trained=True,
                                            normalization={"mean": [0.5], "std": [0.25]})
    out = str(tmp_path / "timm")
    assert export_lib.main([f"--input={export}", "--format=timm", f"--output={out}"]) == 0
    x = images(64, 1)
    ours = export_lib.our_features(variables, config, x)
    theirs = torch_features(torch_model(out, "timm"), "timm", x, config)
    assert ours.shape == (3, 32) and export_lib.relative_difference(theirs, ours) <= TOLERANCE
    assert_round_trip(out, "timm", variables, {k: v for k, v in model.items() if k not in ("input_mean", "input_std")})
    with open(os.path.join(out, "README.md")) as f:
        assert "ConvNeXt (DINOv3's layout): blocks [1, 1, 2, 1]" in f.read()
    with pytest.raises(to_torch.ExportError, match="takes a vit export, this one is a convnext"):
        export_lib.export(export, "hf", str(tmp_path / "hf"))


def test_model_card_says_what_a_user_needs(tmp_path):
    model, channels, size = RESNETS["resnet18-grey"]
    export, _, _ = make_export(tmp_path / "run" / "export", model, channels, size, trained=True)
    os.makedirs(tmp_path / "run" / "eval")
    with open(tmp_path / "run" / "eval" / "summary.json", "w") as f:
        json.dump({"mode": "linear_probe", "store": {"name": "phantoms"}, "split": "test", "mean_auc": 0.8125,
                   "num_examples": 40, "random_init": {"mean_auc": 0.7},
                   "vs_random_init": {"mean_auc_diff": 0.1125, "ci95": [0.05, 0.17], "num_resamples": 1000}}, f)
    out = tmp_path / "tv"
    card = export_lib.export(export, "torchvision", str(out))
    with open(out / "README.md") as f:
        assert f.read() == card
    for needed in ("ResNet-18", "simclr, 7 steps", "store `phantoms`, 123 images", "0.812", "+0.113",
                   "[95 % CI +0.050, +0.170]", "pixels scaled to [0, 1]", "strict=True", "def build_resnet", "1 channel(s)"):
        assert needed in card, needed
    assert str(tmp_path) not in card  # no local path of the machine that wrote it


def test_exports_that_would_lose_information_fail_in_one_line(tmp_path, capsys):
    swiglu = {"name": "vit", "variant": "S/16", "depth": 1, "image_size": 32, "ffn": "swiglu"}
    export, _, _ = make_export(tmp_path / "swiglu", swiglu, 3, 32, trained=False)
    assert export_lib.main([f"--input={export}", "--format=timm", f"--output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "block_0/mlp/w12" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "o")  # nothing half-written
    rope = {"name": "vit", "variant": "S/16", "depth": 1, "image_size": 32, "position": "rope"}
    rope_export, _, _ = make_export(tmp_path / "rope", rope, 3, 32, trained=False)
    with pytest.raises(to_torch.ExportError, match="position='rope'"):
        export_lib.export(rope_export, "hf", str(tmp_path / "o"))
    with pytest.raises(to_torch.ExportError, match="takes a resnet export, this one is a vit"):
        export_lib.export(export, "torchvision", str(tmp_path / "o"))
    with pytest.raises(to_torch.ExportError, match=r"blocks_0/attn/qkv/kernel has no slot in the toy layout"):
        to_torch.invert({"blocks_0": {"attn": {"qkv": {"kernel": np.zeros((2, 6))}}}},
                        lambda names: ((f"<no source for {'/'.join(names)}>",), convert._same), target="toy")
    model, channels, size = RESNETS["resnet18-grey"]
    export, _, _ = make_export(tmp_path / "r18", model, channels, size, trained=False)
    os.makedirs(tmp_path / "taken")
    open(tmp_path / "taken" / "keep.txt", "w").close()
    with pytest.raises(to_torch.ExportError, match="exists and is not empty"):
        export_lib.export(export, "torchvision", str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_onnx_export_runs_in_onnxruntime_like_ours(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torchvision_ops.import_torchvision()
    model, channels, size = RESNETS["resnet18-grey"]
    export, variables, config = make_export(tmp_path / "export", model, channels, size, trained=True)
    out = tmp_path / "onnx"
    export_lib.export(export, "onnx", str(out))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = images(size, channels, n=5)  # another batch size than the traced one
    theirs = session.run(None, {"images": export_lib.torch_input(x, config)})[0]
    assert export_lib.relative_difference(theirs, export_lib.our_features(variables, config, x)) <= TOLERANCE
    with open(out / "onnx.json") as f:
        assert "onnxruntime" in json.load(f)["checked"]
