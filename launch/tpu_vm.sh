#!/usr/bin/env bash
# Run a qwen_image_rl job on every host of a TPU VM slice (multi-host: jax.distributed is
# initialised automatically on pods, see qwen_image_rl/parallel/mesh.py).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/sft.py:qwen_image gs://bucket/runs/exp1 [--config.x=y ...]
#
# Installs the package with the `tpu` extra on each host (idempotent), then starts the same
# command everywhere. The workdir should be on GCS or a shared filesystem so every host sees the
# same checkpoints.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n 2,10p "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
if [ -z "$REPO_URL" ]; then
  echo "error: set REPO_URL to a clone URL reachable from the TPU VMs" >&2; exit 2
fi
CMD="set -e; [ -d qwen_image_rl ] || git clone -q $REPO_URL qwen_image_rl; cd qwen_image_rl; git pull -q;
python3 -m pip install -q -c constraints.txt -e '.[tpu]';
python3 -m qwen_image_rl.main --config=$CONFIG --workdir=$WORKDIR $*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$CMD"
