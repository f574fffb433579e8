#!/usr/bin/env bash
# Per-host part of a multi-host run: idempotent setup, then the same command on every host.
#
#   bash launch/run_host.sh tpu|gpu --config=configs/micle.py --workdir=/mnt/shared/runs/micle
#
# Creates .venv if missing, installs jax for the accelerator and the requirements, then runs
# `python -m medssl_jax.main` with MEDSSL_DISTRIBUTED=1 so jax.distributed.initialize() joins the hosts
# (Cloud TPU and SLURM are detected by jax itself). The workdir and the store must be on storage every
# host sees (NFS, Filestore, or a bucket mounted with gcsfuse).
set -euo pipefail
cd "$(dirname "$0")/.."
accelerator="${1:?usage: run_host.sh tpu|gpu ARGS...}"
shift
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
case "$accelerator" in
  tpu) extra='jax[tpu]' ;;
  gpu) extra='jax[cuda13]' ;;
  *) echo "error: accelerator must be tpu or gpu, got '$accelerator'" >&2; exit 2 ;;
esac
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q -U "$extra"
export MEDSSL_DISTRIBUTED=1
exec .venv/bin/python -m medssl_jax.main "$@"
