#!/usr/bin/env bash
# One prepared benchmark run on a GPU machine (H100/H200), about 6-8 minutes: this project's SimCLR
# ResNet-50 / ViT-B/16 and SwAV steps, feature extraction and host pipeline, next to PyTorch's
# torch.compile reference of the same step, in one table (medssl_jax/bench_suite.py).
#
#   launch/device_suite.sh [--rows=...]          # results in $OUT (or /tmp/bench_suite): table.md, suite.json
#
# The GPU machine has jax (CUDA), PyTorch, torchvision and the rest; the wheels it lacks come from .whl/
# (launch/fetch_device_wheels.sh) and go to /tmp/site, ahead of its own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
python3 -m medssl_jax.bench_suite --out="${OUT:-/tmp/bench_suite}" "$@"
