"""Command line: take an encoder export to PyTorch (safetensors only, no pickle), with a model card.

    python -m medssl_jax.export --input=RUN/export --format=torchvision --output=OUT   # our ResNets
    python -m medssl_jax.export --input=RUN/export --format=timm --output=OUT          # our ViTs
    python -m medssl_jax.export --input=RUN/export --format=hf --output=OUT            # ViTs: transformers
    python -m medssl_jax.export --input=RUN/export --format=onnx --output=OUT          # needs torch (+ timm)

OUT holds model.safetensors (a state_dict the target loads with strict=True), what builds the model
(torchvision.json / timm.json / transformers' config.json + preprocessor_config.json), README.md (the
model card: architecture, pretraining, data, evaluation, input normalisation, the loading code) and, for
a fine-tuned model (E/export), head.safetensors with labels.json. Before anything is written the weights
are imported back (medssl_jax.models.convert) and must equal the export's bit for bit; a layer the target
has no slot for stops the export with one line naming it. `--format=onnx` traces the PyTorch model
(torchvision, or timm for ViTs) with torch.onnx's exporter (needs onnx and onnxscript) and checks its
features against ours with onnxruntime when that is installed.
The reverse direction is `python -m medssl_jax.convert --format=torchvision-resnet|timm|hf-dinov2 --input=OUT`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys

import jax
import numpy as np

from medssl_jax import checkpoint, jsonio, models
from medssl_jax.models import convert as convert_lib
from medssl_jax.models import to_torch

FORMATS = (*to_torch.FORMATS, "onnx")
CARD = "README.md"
ONNX_TOLERANCE = 1e-5  # max |ONNX - JAX| / max |JAX| on random images, float32 both


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m medssl_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a medssl_jax export directory (RUN/export, E/export)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="directory to write (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def _save_safetensors(path: str, state: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata={"format": "pt"})


def read_input(directory: str) -> tuple[dict, dict, int]:
    """(variables, export config, the encoder's input channels) of an export directory."""
    variables, config = checkpoint.load_export(directory)
    model = config["model"]
    if model.get("name") not in ("resnet", "vit", "convnext"):
        raise to_torch.ExportError(f"{directory}: encoder {model.get('name')!r} is not a resnet, vit or convnext")
    # The model's input channels (its first layer's), not the data's: a grey store can train a 3-channel
    # converted encoder, which replicates grey images to RGB.
    kernel = {"resnet": lambda p: p["stem"]["conv"]["kernel"], "vit": lambda p: p["patch_embed"]["kernel"],
              "convnext": lambda p: p["stem"]["kernel"]}[model["name"]](variables["params"])
    return variables, config, int(np.shape(kernel)[2])


def build(fmt: str, variables: dict, config: dict, channels: int) -> dict:
    """{file name: state_dict or JSON object} of the export to `fmt` (torchvision / timm / hf), checked."""
    model = config["model"]
    name = model["name"]
    wanted = {"torchvision": ("resnet",), "timm": ("vit", "convnext"), "hf": ("vit",)}[fmt]
    if name not in wanted:
        hint = {"resnet": "--format=torchvision", "vit": "--format=timm or --format=hf",
                "convnext": "--format=timm"}.get(name, "")
        raise to_torch.ExportError(f"--format={fmt} takes a {' or '.join(wanted)} export, this one is a {name} ({hint})")
    norm = (config.get("input") or {}).get("normalization")
    image_size = int((config.get("input") or {}).get("image_size") or model.get("image_size") or 224)
    recorded_input = {"image_size": image_size, "mean": list(norm["mean"]) if norm else [],
                      "std": list(norm["std"]) if norm else [], "channels": channels}
    if fmt == "torchvision":
        state = to_torch.resnet_state(variables)
        to_torch.check_round_trip(fmt, state, variables, model, extra={})
        return {"model.safetensors": state,
                "torchvision.json": {**to_torch.resnet_spec(model, channels), "input": recorded_input}}
    if fmt == "timm" and name == "convnext":
        spec = to_torch.timm_convnext_spec(model, channels)
        state = to_torch.timm_convnext_state(variables)
        to_torch.check_round_trip(fmt, state, variables, model, extra={})
        return {"model.safetensors": state, "timm.json": {**spec, "input": recorded_input}}
    if fmt == "timm":
        spec = to_torch.timm_spec(model, channels)
        state = to_torch.timm_state(variables, model)
        to_torch.check_round_trip(fmt, state, variables, model, extra={"num_heads": spec["kwargs"]["num_heads"]})
        return {"model.safetensors": state, "timm.json": {**spec, "input": recorded_input}}
    hf = to_torch.hf_config(model, channels)
    state = to_torch.hf_state(variables, model)
    to_torch.check_round_trip(fmt, state, variables, model, extra=hf)
    return {"model.safetensors": state, "config.json": hf,
            "preprocessor_config.json": to_torch.hf_preprocessor(norm, image_size, channels)}


def _head(directory: str) -> tuple[dict, list[str]] | None:
    path = os.path.join(directory, "head.npz")
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as head:
        state = {"weight": np.asarray(head["kernel"], np.float32).T, "bias": np.asarray(head["bias"], np.float32)}
        labels = [str(v) for v in head["label_names"]]
    return state, labels


def _evaluation(directory: str) -> str:
    """One line on the evaluation written beside the export (RUN/eval after pretraining, E/eval after a
    fine-tune), or why there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(directory)), "eval", "summary.json")
    if not os.path.exists(path):
        return "no evaluation beside this export (RUN/eval/summary.json not found)"
    with open(path) as f:
        s = json.load(f)
    what = {"linear_probe": "linear probe", "finetune": "fine-tuned"}.get(s.get("mode"), s.get("mode", "evaluation"))
    line = (f"{what} on `{(s.get('store') or {}).get('name', '?')}`, {s.get('split', 'test')} mean AUC "
            f"{s['mean_auc']:.3f} over {s.get('num_examples', '?')} images")
    vs = s.get("vs_random_init")
    if vs and s.get("random_init"):
        low, high = vs["ci95"]
        line += (f"; random init {s['random_init']['mean_auc']:.3f}, difference {vs['mean_auc_diff']:+.3f} "
                 f"[95 % CI {low:+.3f}, {high:+.3f}] (paired bootstrap, {vs['num_resamples']} resamples)")
    return line


def _architecture(model: dict, channels: int) -> str:
    if model["name"] == "resnet":
        spec = to_torch.resnet_spec(model, channels)
        stem = "3x3 stride-1 stem without max-pool" if spec["cifar_stem"] else f"stem max-pool '{spec['stem_pool']}'"
        return (f"ResNet-{spec['depth']} (SimCLR layout), width x{model.get('width', 1)}, base width "
                f"{model.get('base_width', 64)}, {stem}, {channels} input channel(s), "
                f"{spec['feature_dim']}-d pooled features")
    if model["name"] == "convnext":
        depths, dims = models.build_encoder({**model, "dtype": "float32"}).arch()
        return (f"ConvNeXt (DINOv3's layout{', size ' + model['size'] if model.get('size') else ''}): blocks "
                f"{list(depths)}, widths {list(dims)}, {channels} input channel(s), {dims[-1]}-d features (the "
                "normed pooled map)")
    arch = to_torch._vit_arch(model)
    return (f"ViT {model.get('variant', '')}: width {arch['width']}, depth {arch['depth']}, {arch['num_heads']} heads, "
            f"patch {arch['patch_size']}, {arch['num_registers']} registers, position grid for "
            f"{arch['image_size']} px, pool '{arch['pool']}', {channels} input channel(s)")


def _loading_code(fmt: str, config: dict, channels: int) -> str:
    if fmt == "torchvision":
        return ("import json\nfrom safetensors.torch import load_file\n\n"
                + inspect.getsource(to_torch.torchvision_resnet).replace("def torchvision_resnet", "def build_resnet")
                + "\n\nspec = json.load(open(\"OUT/torchvision.json\"))\nmodel = build_resnet(spec).eval()\n"
                "model.load_state_dict(load_file(\"OUT/model.safetensors\"), strict=True)\n"
                "features = model(x)  # x: [B, C, H, W] float32, prepared as under Input")
    if fmt == "timm":
        return ("import json\nimport timm\nfrom safetensors.torch import load_file\n\n"
                "spec = json.load(open(\"OUT/timm.json\"))\n"
                "model = timm.create_model(spec[\"model_name\"], **spec[\"kwargs\"]).eval()\n"
                "model.load_state_dict(load_file(\"OUT/model.safetensors\"), strict=True)\n"
                "features = model(x)  # x: [B, C, H, W] float32 at img_size, prepared as under Input")
    if fmt == "hf":
        arch = to_torch._vit_arch(config["model"])
        if arch["pool"] == "token":
            pooled = "features = out.pooler_output  # the normed CLS token"
        elif arch["pool"] == "gap":
            pooled = (f"features = out.last_hidden_state[:, 1 + {arch['num_registers']}:].mean(1)"
                      "  # mean of the normed patch tokens")
        else:
            pooled = ("h = out.last_hidden_state\nfeatures = torch.cat([h[:, 0], "
                      f"h[:, 1 + {arch['num_registers']}:].mean(1)], dim=-1)  # normed CLS + patch mean")
        return ("import torch\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
                "processor = AutoImageProcessor.from_pretrained(\"OUT\")\n"
                "model = AutoModel.from_pretrained(\"OUT\").eval()\n"
                "with torch.no_grad():\n    out = model(**processor(images, return_tensors=\"pt\"))\n" + pooled)
    return ("import numpy as np\nimport onnxruntime as ort\n\n"
            "session = ort.InferenceSession(\"OUT/model.onnx\")\n"
            "features = session.run(None, {\"images\": x})[0]  # x: [B, C, H, W] float32 numpy, as under Input")


def model_card(fmt: str, config: dict, channels: int, files: dict, *, input_dir: str, head_labels) -> str:
    model, source = config["model"], config.get("source") or {}
    train_config = config.get("train_config") or {}
    norm = (config.get("input") or {}).get("normalization")
    size = (config.get("input") or {}).get("image_size") or model.get("image_size")
    target = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers (Dinov2Model)",
              "onnx": "ONNX"}[fmt]
    method = source.get("method", "?")
    lines = [f"# medssl_jax encoder ({method}), exported for {target}", "",
             "Written by `python -m medssl_jax.export`; the weights were imported back and equal the JAX export "
             "bit for bit.", "", "| | |", "|---|---|",
             f"| architecture | {_architecture(model, channels)} |"]
    if method == "finetune":
        lines.append(f"| training | fine-tuned from `{source.get('init') or 'random init'}` "
                     f"({source.get('init_method', '?')}), {source.get('steps', '?')} steps |")
    else:
        recipe = ""
        if train_config:
            optim = train_config.get("optim") or {}
            recipe = (f", batch {train_config.get('batch_size')}, {optim.get('name', '')} base lr "
                      f"{optim.get('base_lr')}, image size {(train_config.get('data') or {}).get('image_size')}, "
                      f"seed {train_config.get('seed')}; the whole config is in the export's config.json")
        lines.append(f"| pretraining | {method}, {source.get('steps', '?')} steps{recipe}"
                     + (f", initialised from `{source['init']}`" if source.get("init") else "") + " |")
    count = source.get("num_images")
    lines.append(f"| data | store `{source.get('store', '?')}`"
                 + (f", {count} images of split `{source.get('split')}`" if count else ", image count not recorded")
                 + " (no patient data here) |")
    lines.append(f"| evaluation | {_evaluation(input_dir)} |")
    if norm:
        prep = (f"pixels scaled to [0, 1] (/ 255 for 8-bit images, / (2^bits - 1) for DICOM), then (x - mean) / std "
                f"per channel, mean {norm['mean']}, std {norm['std']}")
    else:
        prep = "pixels scaled to [0, 1] (/ 255 for 8-bit images, / (2^bits - 1) for DICOM), no mean / std"
    grey = " (repeat a grey image to 3 channels first)" if channels == 3 else ""
    lines.append(f"| input | {channels} channel(s){grey}, {size} x {size} px, NCHW float32: {prep} |")
    if head_labels:
        lines.append(f"| head | head.safetensors: torch.nn.Linear({{weight, bias}}) over the features, one output per "
                     f"label of labels.json ({', '.join(head_labels)}) |")
    for name in sorted(files):
        lines.append(f"| {name} | sha256 {files[name]} |")
    lines += ["", "## Load it", "", "Replace OUT with this directory.", "", "```python",
              _loading_code(fmt, config, channels), "```", ""]
    if fmt == "torchvision" and model.get("stem_pool", "same") == "same" and not model.get("cifar_stem"):
        lines += ["The stem max-pool reproduces TF 'SAME' padding exactly when image sides are divisible by 4.", ""]
    if fmt in ("timm", "hf"):
        lines += [f"At {model.get('image_size')} px the position embeddings are used as stored; other sizes are "
                  "resampled by the target library's own rule, which can differ slightly from medssl_jax's.", ""]
    return "\n".join(lines)


def our_features(variables: dict, config: dict, images: np.ndarray) -> np.ndarray:
    """The JAX encoder's features of images [B, H, W, C] in [0, 1] (float32 compute)."""
    encoder = models.build_encoder({**config["model"], "dtype": "float32"})
    return np.asarray(jax.jit(lambda v, x: encoder.apply(v, x, train=False)[0])(variables, images))


def torch_input(images: np.ndarray, config: dict) -> np.ndarray:
    """What the PyTorch model takes for the same images, as the card says: grey repeated to the channels
    of a 3-channel ViT (ours does that inside), (x - mean) / std, NCHW."""
    norm = (config.get("input") or {}).get("normalization")
    x = np.asarray(images, np.float32)
    in_chans = (int(config["model"].get("in_chans", 3)) if config["model"].get("name") in ("vit", "convnext")
                else x.shape[-1])
    if x.shape[-1] == 1 and in_chans > 1:
        x = np.broadcast_to(x, (*x.shape[:-1], in_chans))
    if norm:
        mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
        if x.shape[-1] != mean.shape[0]:
            x = np.broadcast_to(x, (*x.shape[:-1], mean.shape[0]))
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the agreement figure the export checks and reports."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _onnx(variables: dict, config: dict, channels: int, output: str) -> dict:
    try:
        import torch
    except ImportError:
        raise to_torch.ExportError("--format=onnx needs PyTorch (pip install torch; the CPU build is enough)") from None
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter (torch.export based) builds the graph with it
    except ImportError:
        raise to_torch.ExportError("--format=onnx needs onnx and onnxscript (pip install onnx onnxscript; "
                                   "onnxruntime to check the result)") from None
    fmt = "torchvision" if config["model"]["name"] == "resnet" else "timm"
    items = build(fmt, variables, config, channels)
    spec = items[f"{fmt}.json"]
    if fmt == "torchvision":
        try:
            net = to_torch.torchvision_resnet(spec)
        except ImportError:
            raise to_torch.ExportError("--format=onnx of a ResNet needs torchvision (pip install torchvision)") from None
    else:
        try:
            import timm
        except ImportError:
            raise to_torch.ExportError("--format=onnx of a ViT or ConvNeXt needs timm (pip install timm)") from None
        net = timm.create_model(spec["model_name"], **spec["kwargs"])
    net.load_state_dict({k: torch.from_numpy(v) for k, v in items["model.safetensors"].items()}, strict=True)
    net.eval()
    size = spec["kwargs"]["img_size"] if "img_size" in spec.get("kwargs", {}) else spec["input"]["image_size"]
    example = torch.zeros((1, channels, size, size))
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.onnx")
    torch.onnx.export(net, (example,), path, input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=True)
    record = {"input": spec["input"], "image_size": size, "from": fmt}
    try:
        import onnxruntime
    except ImportError:
        record["checked"] = "not checked: onnxruntime is not installed"
        return {"onnx.json": record}
    images = np.random.default_rng(0).uniform(size=(2, size, size, channels)).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"images": torch_input(images, config)})[0]
    difference = relative_difference(theirs, our_features(variables, config, images))
    if not difference <= ONNX_TOLERANCE:
        raise to_torch.ExportError(f"the ONNX model's features differ from the JAX encoder's by {difference:.2e} "
                                   f"(relative, more than {ONNX_TOLERANCE:g})")
    record["checked"] = f"onnxruntime {onnxruntime.__version__}: features within {difference:.1e} of the JAX encoder's"
    return {"onnx.json": record}


def _write(items: dict, output: str) -> dict[str, str]:
    os.makedirs(output, exist_ok=True)
    digests = {}
    for name, item in items.items():
        path = os.path.join(output, name)
        if name.endswith(".safetensors"):
            _save_safetensors(path, item)
        else:
            jsonio.write_json(path, item)
        digests[name] = convert_lib.file_sha256(path)
    return digests


def export(input_dir: str, fmt: str, output: str, *, overwrite: bool = False) -> str:
    """Writes `output` (see the module docstring); returns its model card."""
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise to_torch.ExportError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    variables, config, channels = read_input(input_dir)
    items = None if fmt == "onnx" else build(fmt, variables, config, channels)  # every check before writing
    head = _head(input_dir)
    tmp = output.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if fmt == "onnx":
        items = _onnx(variables, config, channels, tmp)
    files = _write(items, tmp)
    for name in sorted(os.listdir(tmp)):  # the ONNX graph and its external weights, when torch wrote them
        files.setdefault(name, convert_lib.file_sha256(os.path.join(tmp, name)))
    labels = None
    if head is not None:
        state, labels = head
        files.update(_write({"head.safetensors": state, "labels.json": labels}, tmp))
    card = model_card(fmt, config, channels, files, input_dir=input_dir, head_labels=labels)
    with open(os.path.join(tmp, CARD), "w") as f:
        f.write(card)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)  # the output appears complete or not at all
    return card


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args.input, args.format, args.output, overwrite=args.overwrite)
    except (to_torch.ExportError, checkpoint.CheckpointError, convert_lib.ConvertError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({args.format}): " + ", ".join(sorted(os.listdir(args.output))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
