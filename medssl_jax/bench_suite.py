"""One prepared accelerator run: this project's steps next to PyTorch's, measured in the same run, one table.

    python -m medssl_jax.bench_suite --out=DIR             # one H100/H200: about 6-8 minutes
    python -m medssl_jax.bench_suite --smoke --out=DIR     # any CPU, tiny sizes, about a minute (tested)

`launch/device_suite.sh` is the command for a lent GPU machine (it installs the wheels it lacks first).

Rows, each in its own subprocess (its peak device memory is its own, and one failing row does not lose the
others; a row past its time limit is reported as such):

  jax-simclr-r50     SimCLR ResNet-50 (configs/simclr.py), 256 images x 2 views at 224 px, bf16, LARS, the
                     recipe's device-side augmentation: step-only and end-to-end views/s, MFU, peak memory
  jax-simclr-vitb16  the same step with a ViT-B/16 encoder (1 input channel, cuDNN attention on a GPU)
  jax-swav-r50       SwAV ResNet-50 (configs/swav.py), 2 x 224 + 6 x 96 crops (a view is one crop)
  jax-features-r50   linear-probe feature extraction: ResNet-50 forward at 224 px, bf16
  torch-simclr-r50   the reference: the same step in PyTorch, torchvision ResNet-50 (1 input channel) +
                     SimCLR v1 head, NT-Xent at the same temperature, SGD, torch.compile, AMP bf16,
                     channels_last, same batch (no augmentation: the JAX step does more work)
  torch-simclr-vitb16  the same with a ViT-B/16 (pre-LN, GELU, torch's scaled_dot_product_attention)
  host-pipeline      the host side of one SimCLR step: store read + decode + 2 random-resized crops at 224 px
                     per image on ONE core, hence the cores one GPU step needs (step views/s / per-core views/s)

End-to-end rows read a phantom store generated at 256 px in DIR/cache (Grain workers = all host cores).
The table (DIR/table.md) gives each JAX row's ratio to its PyTorch reference; DIR/suite.json has every
number, the versions and the device. Record the table in BENCHMARKS.md with the date and the command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

ROWS = ("jax-simclr-r50", "jax-simclr-vitb16", "jax-swav-r50", "jax-features-r50", "torch-simclr-r50",
        "torch-simclr-vitb16", "host-pipeline")
REFERENCE = {"jax-simclr-r50": "torch-simclr-r50", "jax-simclr-vitb16": "torch-simclr-vitb16"}
FULL = {"batch": 256, "size": 224, "local": 96, "phantom_size": 256, "phantom_patients": 600, "steps": 30,
        "warmup": 5, "row_timeout_s": 150}
SMOKE = {"batch": 8, "size": 32, "local": 16, "phantom_size": 48, "phantom_patients": 24, "steps": 2,
         "warmup": 1, "row_timeout_s": 240}
TEMPERATURE = 0.1


# ------------------------------------------------------------------------------------------ JAX rows

def _simclr_config(sizes: dict, store: str, *, smoke: bool, vit: bool = False):
    from medssl_jax import config_lib, models

    c = config_lib.load_config("simclr", "runlocal" if smoke else None)
    if smoke:
        c.model.update(depth=18, base_width=4)  # the same code as ResNet-50, a fraction of its compile time
    c.data.update(store=store, image_size=sizes["size"], num_workers=1 if smoke else (os.cpu_count() or 1))
    c.batch_size = sizes["batch"]
    c.total_steps = 1000
    c.optim.warmup_steps = 10
    c.loss.temperature = TEMPERATURE
    c.probe.enabled = False
    if vit:
        fields = dict(variant="B/16", image_size=sizes["size"], in_chans=1, pool="token",
                      attention="xla" if smoke else "cudnn")
        if smoke:
            fields.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
        c.model = models.model_config("vit", **fields)
        c.head.hidden_dim = -1
    if not smoke:
        c.compute_dtype = "bfloat16"
        c.head.hidden_dim = -1
        c.head.out_dim = 128
    return c


def _swav_config(sizes: dict, store: str, *, smoke: bool):
    from medssl_jax import config_lib

    c = config_lib.load_config("swav", "runlocal" if smoke else None)
    if smoke:
        c.model.update(depth=18, base_width=4)
        c.swav.num_local_crops = 6
    c.data.update(store=store, image_size=sizes["size"], num_workers=0 if smoke else (os.cpu_count() or 1))
    c.swav.local_image_size = sizes["local"]
    c.batch_size = sizes["batch"]
    c.total_steps = 1000
    c.probe.enabled = False
    if not smoke:
        c.compute_dtype = "bfloat16"
    return c


def _peak_memory() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return float(peak) / 2**30 if peak else None


def jax_pretrain_row(config, sizes: dict) -> dict:
    from medssl_jax import bench

    result = bench.benchmark(config, steps=sizes["steps"], warmup=sizes["warmup"], mode="both")
    result["peak_memory_gib"] = _peak_memory()
    return result


def jax_features_row(sizes: dict, *, smoke: bool) -> dict:
    import jax

    from medssl_jax import sharding
    from medssl_jax.evaluate import encoders, features, linear_probe

    config = linear_probe.reference_config()
    config.init = "random"
    config.model = {"name": "resnet", "depth": 18 if smoke else 50, "width": 1, "base_width": 4 if smoke else 64}
    config.image_size = sizes["size"]
    config.compute_dtype = "float32" if smoke else "bfloat16"
    encoder = encoders.load_encoder(config, channels=1)
    result = features.bench_features(encoder.model, encoder.variables, image_size=sizes["size"], channels=1,
                                     batch_size=sizes["batch"], mesh=sharding.make_mesh(), steps=sizes["steps"])
    result.update(device_kind=jax.devices()[0].device_kind, peak_memory_gib=_peak_memory())
    return result


def host_pipeline_row(store: str, sizes: dict, elements: int) -> dict:
    """Per-core cost of the host side of a SimCLR step (read, decode, 2 crops + resize + flip)."""
    import numpy as np

    from medssl_jax.data import pipeline
    from medssl_jax.data.store import Store

    opened = Store(store)
    groups = pipeline.pretrain_groups(opened, sampler="pairs", split="train")
    crops = [{"name": "global", "num": 2, "size": sizes["size"], "scale": (0.08, 1.0)}]
    views = pipeline.SampleViews(opened.data_source(), groups, crops)
    rng = np.random.default_rng(0)
    count = len(groups[0]) - 1
    views.random_map(0, rng)  # open the shards outside the timing
    start = time.process_time()
    for i in range(elements):
        views.random_map(i % count, rng)
    seconds = time.process_time() - start
    return {"elements": elements, "cpu_ms_per_image": 1000 * seconds / elements,
            "views_per_s_per_core": 2 * elements / seconds, "host_cores": os.cpu_count()}


# ------------------------------------------------------------------------------------------ PyTorch rows

def _torch_resnet50():
    """torchvision's ResNet-50 when installed (the GPU image has it); else the same architecture here."""
    import torch
    from torch import nn

    try:
        import torchvision

        model = torchvision.models.resnet50()
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        model.fc = nn.Identity()
        return model, 2048
    except (ImportError, RuntimeError):  # not installed, or a build that does not match torch's: fails at import
        pass

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = 4 * width
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Identity() if stride == 1 and cin == cout else
                          nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    layers = [nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        for block in range(blocks):
            layers.append(Bottleneck(cin, 64 * 2**stage, 2 if stage > 0 and block == 0 else 1))
            cin = 4 * 64 * 2**stage
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 2048


def _torch_vit(size: int, *, smoke: bool):
    import torch
    from torch import nn

    width, depth, heads, mlp, patch = (32, 2, 2, 64, 8) if smoke else (768, 12, 12, 3072, 16)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, width, patch, patch)
            tokens = (size // patch) ** 2 + 1
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
            layer = nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True, layer_norm_eps=1e-6)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
            return self.norm(self.blocks(x))[:, 0]

    return ViT(), width


def torch_simclr_row(sizes: dict, *, vit: bool, smoke: bool) -> dict:
    import torch
    from torch import nn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, dim = _torch_vit(sizes["size"], smoke=smoke) if vit else _torch_resnet50()
    head = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, 128, bias=False), nn.BatchNorm1d(128, affine=False))
    model = nn.Sequential(encoder, head).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(model)
    batch = sizes["batch"]
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(2 * batch, 1, sizes["size"], sizes["size"], generator=generator).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(2 * batch, device=device).roll(batch)  # view i's positive is view i +- B
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step():
        with amp:
            z = nn.functional.normalize(compiled(images).float(), dim=1)
            logits = z @ z.T / TEMPERATURE
            logits = logits - 1e9 * torch.eye(2 * batch, device=device)
            loss = nn.functional.cross_entropy(logits, labels)  # NT-Xent over 2B views (the paper's L)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    for _ in range(sizes["warmup"]):
        step()
    sync()
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for _ in range(sizes["steps"]):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    return {"step_only_views_per_s": sizes["steps"] * 2 * batch / seconds, "step_only_ms": 1000 * seconds / sizes["steps"],
            "warmup_s": compile_s, "loss": float(loss), "device": torch.cuda.get_device_name() if device == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


# ------------------------------------------------------------------------------------------ driver

def run_row(name: str, sizes: dict, store: str, *, smoke: bool) -> dict:
    if name == "jax-simclr-r50":
        return jax_pretrain_row(_simclr_config(sizes, store, smoke=smoke), sizes)
    if name == "jax-simclr-vitb16":
        return jax_pretrain_row(_simclr_config(sizes, store, smoke=smoke, vit=True), sizes)
    if name == "jax-swav-r50":
        return jax_pretrain_row(_swav_config(sizes, store, smoke=smoke), sizes)
    if name == "jax-features-r50":
        return jax_features_row(sizes, smoke=smoke)
    if name == "torch-simclr-r50":
        return torch_simclr_row(sizes, vit=False, smoke=smoke)
    if name == "torch-simclr-vitb16":
        return torch_simclr_row(sizes, vit=True, smoke=smoke)
    if name == "host-pipeline":
        return host_pipeline_row(store, sizes, elements=20 if smoke else 300)
    raise ValueError(f"--row={name!r} is not one of {ROWS}")


def versions() -> dict:
    out = {"python": platform.python_version(), "host_cores": os.cpu_count()}
    # Installed distributions' versions, read without importing them (an installed torchvision that does
    # not match torch's build fails at import; the report should still say which one it is).
    for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"),
                       ("orbax.checkpoint", "orbax-checkpoint"), ("grain", "grain"), ("torch", "torch"),
                       ("torchvision", "torchvision")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["gpu"] = None
    return out


def _fmt(value, spec=",.0f") -> str:
    return "–" if value is None else format(value, spec)


def table(results: dict) -> str:
    lines = ["| row | step-only views/s | end-to-end views/s | e2e / step | MFU | peak GiB | vs PyTorch | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name in (n for n in ROWS if n in results):
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | – | – | – | – | – | – | {r['error'][:120]} |")
            continue
        step = r.get("step_only_views_per_s", r.get("images_per_s"))
        ratio = None
        if name in REFERENCE and "step_only_views_per_s" in results.get(REFERENCE[name], {}):
            ratio = step / results[REFERENCE[name]]["step_only_views_per_s"] if step else None
        note = ""
        if name == "host-pipeline":
            step = r.get("views_per_s_per_core")
            need = results.get("jax-simclr-r50", {}).get("step_only_views_per_s")
            note = (f"{r['cpu_ms_per_image']:.2f} CPU ms per image (2 crops) on one core"
                    + (f"; one GPU step needs {need / step:.1f} cores" if need and step else ""))
        elif name == "jax-features-r50":
            note = "images/s, forward only"
        elif "warmup_s" in r:
            note = f"warm-up incl. torch.compile {r['warmup_s']:.0f} s"
        lines.append(f"| {name} | {_fmt(step)} | {_fmt(r.get('end_to_end_views_per_s'))} | "
                     f"{_fmt(r.get('end_to_end_over_step_only'), '.0%')} | {_fmt(r.get('mfu'), '.1%')} | "
                     f"{_fmt(r.get('peak_memory_gib'), '.1f')} | {_fmt(ratio, '.2f')}x | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl_jax.bench_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for suite.json, table.md and the store cache")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU (what the test runs)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.out, "cache")
    if args.row:
        from absl import flags

        from medssl_jax.data import phantoms

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; this CLI is argparse
            flags.FLAGS.mark_as_parsed()

        store = str(phantoms.ensure_phantom_store(cache, num_patients=sizes["phantom_patients"],
                                                  image_size=sizes["phantom_size"], seed=0))
        result = run_row(args.row, sizes, store, smoke=args.smoke)
        with open(os.path.join(args.out, f"{args.row}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: {unknown} not in {ROWS}")
    from medssl_jax.data import phantoms

    start = time.perf_counter()
    phantoms.ensure_phantom_store(cache, num_patients=sizes["phantom_patients"], image_size=sizes["phantom_size"],
                                  seed=0)
    print(f"bench_suite: phantom store ready ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {}
    for name in rows:
        row_start = time.perf_counter()
        command = [sys.executable, "-m", "medssl_jax.bench_suite", f"--out={args.out}", f"--row={name}"]
        command += ["--smoke"] if args.smoke else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=sizes["row_timeout_s"])
            if done.returncode == 0:
                with open(os.path.join(args.out, f"{name}.json")) as f:
                    results[name] = json.load(f)
            else:
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                results[name] = {"error": f"exit {done.returncode}: {lines[-1] if lines else '?'}"}
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"over its {sizes['row_timeout_s']} s limit"}
        print(f"bench_suite: {name} done in {time.perf_counter() - row_start:.0f} s"
              + (f" ({results[name]['error']})" if "error" in results[name] else ""), flush=True)
    report = {"format": "medssl_jax.bench_suite", "smoke": args.smoke, "sizes": sizes, "versions": versions(),
              "date": time.strftime("%Y-%m-%d"), "rows": results, "seconds": time.perf_counter() - start}
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(json.dumps(report["versions"]))
    print(text, flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
