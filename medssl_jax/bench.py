"""Throughput benchmark of the pretraining step: device-resident data and end to end from the store.

  python -m medssl_jax.bench --config=configs/simclr.py --config.batch_size=256 --steps=50

* step-only: one batch stays on the device and the jitted train step runs `--steps` times: the ceiling
  set by the model, the loss and the optimiser.
* end-to-end: every step pulls a fresh batch from the Grain pipeline over the store (decode, crops,
  host->device transfer), as training does.

Reports views/s (a view is one augmented crop through the encoder), the ratio end-to-end/step-only,
the FLOPs of one step from XLA's cost analysis and the MFU against the device's bf16 dense peak when the
device is known. Results go to stdout as a table and, with --out, to a JSON file; record them in
BENCHMARKS.md with the date, device and versions.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from medssl_jax import sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/simclr.py", "Pretraining config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps first (compilation, caches).")
_MODE = flags.DEFINE_enum("mode", "both", ["step", "e2e", "both"], "What to measure.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

# bf16 dense peak FLOP/s per device, matched against jax's device_kind.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def step_flops(run, state, batch) -> float | None:
    """FLOPs of one global train step according to XLA (None if the backend does not say)."""
    analysis = run.train_step.lower(state, batch).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def _time_steps(run, state, next_batch, steps: int):
    metrics = None
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.train_step(state, next_batch())
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def benchmark(config, *, steps: int, warmup: int, mode: str) -> dict:
    run = train.setup(config)
    state = run.fresh_state()
    fixed = sharding.to_global(next(run.data_iter), run.mesh)
    flops = step_flops(run, state, fixed)
    result = {
        "method": config.method,
        "model": config.model.to_dict(),
        "batch_size": config.batch_size,
        "views_per_step": run.views_per_step,
        "image_size": config.data.image_size,
        "compute_dtype": config.compute_dtype,
        "num_workers": config.data.num_workers,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "host_cores": os.cpu_count(),
        "flops_per_step": flops,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    state, _ = _time_steps(run, state, lambda: fixed, warmup)
    if mode in ("step", "both"):
        state, seconds = _time_steps(run, state, lambda: fixed, steps)
        result["step_only_views_per_s"] = steps * run.views_per_step / seconds
        result["step_only_ms"] = 1000 * seconds / steps
    if mode in ("e2e", "both"):
        next_batch = lambda: sharding.to_global(next(run.data_iter), run.mesh)  # noqa: E731
        state, _ = _time_steps(run, state, next_batch, warmup)
        state, seconds = _time_steps(run, state, next_batch, steps)
        result["end_to_end_views_per_s"] = steps * run.views_per_step / seconds
        result["end_to_end_ms"] = 1000 * seconds / steps
    peak = peak_flops(jax.devices()[0])
    if flops and peak and "step_only_ms" in result:
        result["mfu"] = flops / (result["step_only_ms"] / 1000) / (peak * jax.device_count())
    if "step_only_views_per_s" in result and "end_to_end_views_per_s" in result:
        result["end_to_end_over_step_only"] = result["end_to_end_views_per_s"] / result["step_only_views_per_s"]
    return result


def format_table(result: dict) -> str:
    rows = [
        ("device", f"{result['devices']} x {result['device_kind']} ({result['platform']})"),
        ("method / model", f"{result['method']} / {result['model'].get('name')} {result['model'].get('depth', '')}"),
        ("batch x views @ px", f"{result['batch_size']} -> {result['views_per_step']} views @ {result['image_size']}"),
        ("dtype / workers", f"{result['compute_dtype']} / {result['num_workers']}"),
    ]
    if result.get("flops_per_step"):
        rows.append(("GFLOP per step", f"{result['flops_per_step'] / 1e9:,.1f}"))
    if "step_only_views_per_s" in result:
        rows.append(("step-only views/s", f"{result['step_only_views_per_s']:,.0f} ({result['step_only_ms']:.1f} ms/step)"))
    if "end_to_end_views_per_s" in result:
        rows.append(("end-to-end views/s", f"{result['end_to_end_views_per_s']:,.0f} ({result['end_to_end_ms']:.1f} ms/step)"))
    if "end_to_end_over_step_only" in result:
        rows.append(("end-to-end / step-only", f"{100 * result['end_to_end_over_step_only']:.0f}%"))
    if "mfu" in result:
        rows.append(("MFU (bf16 dense peak)", f"{100 * result['mfu']:.1f}%"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv):
    del argv
    result = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, mode=_MODE.value)
    print(format_table(result), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
