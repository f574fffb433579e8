#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM slice (e.g. v4-32):
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/micle.py --workdir=/mnt/shared/runs/micle
#
# Copies this checkout to each worker and starts launch/run_host.sh there. Rerunning the same command
# resumes from the workdir's last checkpoint (a preempted slice sends SIGTERM: a checkpoint is saved).
set -euo pipefail
tpu="${1:?usage: tpu_vm.sh TPU_NAME ZONE ARGS...}"
zone="${2:?usage: tpu_vm.sh TPU_NAME ZONE ARGS...}"
shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$here" "$tpu":~/medssl_jax
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/medssl_jax && bash launch/run_host.sh tpu$args"
