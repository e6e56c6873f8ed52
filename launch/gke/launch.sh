#!/usr/bin/env bash
# Run qwen_image_rl on a GKE TPU slice: a JobSet (kubectl) or an xpk workload, same command as
# launch/tpu_vm.sh (launch/gke/entrypoint.sh at one commit on every host).
#
# usage: launch/gke/launch.sh [options] NAME CONFIG WORKDIR [-- --config.x=y ...]
#
#   launch/gke/launch.sh --tpu=v5p-64 --weights=gs://my-bucket/Qwen-Image \
#     grpo1 configs/grpo_t2i.py:qwen_image gs://my-bucket/runs/grpo1
#
# options:
#   --tpu=TYPE              v5p-8 | v5p-64 | v5p-128 | v6e-8 | v6e-16 | v6e-256 (default v5p-64)
#   --weights=gs://B/PATH   diffusers-format model directory (JobSet: mounted with GCS FUSE;
#                           xpk: copied to each host's disk by the entry point)
#   --mode=jobset|xpk       kubectl apply of launch/gke/jobset.yaml (default), or xpk, which
#                           builds an image from this checkout on --image
#   --cluster=NAME          the GKE cluster (xpk only)
#   --image=IMAGE           a Python 3.11 image with git (default python:3.11)
#   --service_account=KSA   Kubernetes service account with access to the buckets (default)
#   --max_restarts=N        JobSet restarts; each resumes from WORKDIR's checkpoint (default 3)
#   --commit=SHA            commit to run (default: this checkout's HEAD; JobSet clones it)
#   --repo=URL              clone URL reachable from the pods (default: remote.origin.url)
#   --dry_run               print the rendered manifest and commands instead of running them
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

TPU=v5p-64 WEIGHTS="" MODE=jobset CLUSTER="" IMAGE=python:3.11 KSA=default MAX_RESTARTS=3
COMMIT="" REPO="" DRY_RUN=0 POSITIONAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) TPU=${1#*=} ;;
    --weights=*) WEIGHTS=${1#*=} ;;
    --mode=*) MODE=${1#*=} ;;
    --cluster=*) CLUSTER=${1#*=} ;;
    --image=*) IMAGE=${1#*=} ;;
    --service_account=*) KSA=${1#*=} ;;
    --max_restarts=*) MAX_RESTARTS=${1#*=} ;;
    --commit=*) COMMIT=${1#*=} ;;
    --repo=*) REPO=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
EXTRA=("$@")
[ ${#POSITIONAL[@]} -eq 3 ] || { echo "error: expected NAME CONFIG WORKDIR" >&2; usage; }
NAME=${POSITIONAL[0]} CONFIG=${POSITIONAL[1]} WORKDIR=${POSITIONAL[2]}

# TPU type -> node selector, topology, hosts, chips per host (v5p counts TensorCores: 2/chip).
case "$TPU" in
  v5p-8) ACCEL=tpu-v5p-slice TOPOLOGY=2x2x1 HOSTS=1 CHIPS=4 ;;
  v5p-64) ACCEL=tpu-v5p-slice TOPOLOGY=2x4x4 HOSTS=8 CHIPS=4 ;;
  v5p-128) ACCEL=tpu-v5p-slice TOPOLOGY=4x4x4 HOSTS=16 CHIPS=4 ;;
  v6e-8) ACCEL=tpu-v6e-slice TOPOLOGY=2x4 HOSTS=1 CHIPS=8 ;;
  v6e-16) ACCEL=tpu-v6e-slice TOPOLOGY=4x4 HOSTS=4 CHIPS=4 ;;
  v6e-256) ACCEL=tpu-v6e-slice TOPOLOGY=16x16 HOSTS=64 CHIPS=4 ;;
  *) echo "error: --tpu=$TPU is not one of v5p-8 v5p-64 v5p-128 v6e-8 v6e-16 v6e-256" >&2
     exit 2 ;;
esac
case "$MODE" in jobset|xpk) ;; *) echo "error: --mode=$MODE" >&2; usage ;; esac
if [ "$MODE" = xpk ] && [ -z "$CLUSTER" ]; then
  echo "error: --mode=xpk needs --cluster" >&2; exit 2
fi
case "$WEIGHTS" in
  ""|gs://*/*) ;;
  *) echo "error: --weights must be gs://BUCKET/PATH" >&2; exit 2 ;;
esac
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || {
  echo "error: NAME must be a DNS label (lowercase letters, digits, -)" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/../.." && pwd)
CONFIG_FILE=${CONFIG%%:*}
VARIANT=${CONFIG#"$CONFIG_FILE"}; VARIANT=${VARIANT#:}
[ -f "$HERE/$CONFIG_FILE" ] || { echo "error: config file $CONFIG_FILE not found" >&2; exit 2; }
if [ -n "$VARIANT" ] && ! grep -q "\"$VARIANT\"" "$HERE/$CONFIG_FILE"; then
  echo "error: $CONFIG_FILE has no variant \"$VARIANT\"" >&2; exit 2
fi
COMMIT=${COMMIT:-$(git -C "$HERE" rev-parse HEAD)}
REPO=${REPO:-$(git -C "$HERE" config --get remote.origin.url || true)}

run() {  # print (dry run) or run one command
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

if [ "$MODE" = xpk ]; then
  # xpk copies this checkout into the image, so every host runs this commit's files.
  CMD="bash launch/gke/entrypoint.sh $(printf '%q ' "$CONFIG" "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
  [ -z "$WEIGHTS" ] || CMD="WEIGHTS=$(printf '%q' "$WEIGHTS") $CMD"
  run xpk workload create "--cluster=$CLUSTER" "--workload=$NAME" "--tpu-type=$TPU" \
    --num-slices=1 "--base-docker-image=$IMAGE" "--script-dir=$HERE" "--command=$CMD"
  exit 0
fi

[ -n "$REPO" ] || { echo "error: no --repo and no remote.origin.url" >&2; exit 2; }
BUCKET="" BUCKET_DIR=""
if [ -n "$WEIGHTS" ]; then REST=${WEIGHTS#gs://}; BUCKET=${REST%%/*}; BUCKET_DIR=${REST#*/}; fi
json() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }  # a YAML-safe scalar
ARGS=""
for a in "$CONFIG" "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}; do
  ARGS+="              - $(json "$a")"$'\n'
done
MANIFEST=$(<"$HERE/launch/gke/jobset.yaml")
for pair in "NAME=$NAME" "MAX_RESTARTS=$MAX_RESTARTS" "HOSTS=$HOSTS" "SERVICE_ACCOUNT=$KSA" \
    "ACCELERATOR=$ACCEL" "TOPOLOGY=$TOPOLOGY" "IMAGE=$IMAGE" "REPO=$REPO" "COMMIT=$COMMIT" \
    "CHIPS=$CHIPS" "BUCKET=$BUCKET" "BUCKET_DIR=$BUCKET_DIR"; do
  MANIFEST=${MANIFEST//"{{${pair%%=*}}}"/${pair#*=}}
done
MANIFEST=${MANIFEST//"{{ARGS}}"$'\n'/$ARGS}
if [ -z "$WEIGHTS" ]; then MANIFEST=$(printf '%s\n' "$MANIFEST" | grep -v '# weights$'); fi
if [ "$DRY_RUN" = 1 ]; then
  printf '%s\n' "$MANIFEST"
  echo "# then: kubectl apply -f -"
else
  printf '%s\n' "$MANIFEST" | kubectl apply -f -
  echo "logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$NAME --prefix" \
    "--max-log-requests=$HOSTS"
fi
