#!/usr/bin/env bash
# Container entry point of a GKE TPU job (one container per TPU host); run from a checkout of
# the repository at the job's commit.
#
# usage: bash launch/gke/entrypoint.sh CONFIG WORKDIR [--config.x=y ...]
#   env WEIGHTS: a gs:// diffusers-format model directory (copied to local disk once per
#   host), a local path (e.g. a GCS FUSE mount), or unset.
#
# Installs the package into the image's Python 3.11 and runs qwen_image_rl.main with
# jax.distributed initialised (GKE sets TPU_WORKER_HOSTNAMES / TPU_WORKER_ID on every pod).
# Logs go to stdout: `kubectl logs` shows one log per host.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
CONFIG=$1 WORKDIR=$2; shift 2
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
python3 -m pip install -q -c constraints.txt -e '.[tpu]'
INIT=()
case "${WEIGHTS:-}" in
  "") ;;
  gs://*)
    DEST=/tmp/weights/$(basename "$WEIGHTS")
    # TensorFlow (a dependency) reads gs:// directly; the image needs no gcloud.
    python3 - "$WEIGHTS" "$DEST" <<'PY'
import os, sys
import tensorflow as tf
src, dst = sys.argv[1].rstrip("/"), sys.argv[2]
for root, _, files in tf.io.gfile.walk(src):
  out = os.path.join(dst, os.path.relpath(root, src))
  os.makedirs(out, exist_ok=True)
  for name in files:
    target = os.path.join(out, name)
    if not os.path.exists(target):
      tf.io.gfile.copy(f"{root}/{name}", target + ".tmp", overwrite=True)
      os.replace(target + ".tmp", target)
PY
    INIT=("--config.init_from=$DEST") ;;
  *) INIT=("--config.init_from=$WEIGHTS") ;;
esac
exec python3 -m qwen_image_rl.main "--config=$CONFIG" "--workdir=$WORKDIR" \
  --config.distributed=always ${INIT[@]+"${INIT[@]}"} "$@"
