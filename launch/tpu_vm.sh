#!/usr/bin/env bash
# Run a qwen_image_rl job on every host of a Cloud TPU VM slice, detached, one log per host.
#
# usage: launch/tpu_vm.sh [options] TPU_NAME CONFIG WORKDIR [-- --config.x=y ...]
#
#   launch/tpu_vm.sh --zone=us-east5-a --weights=gs://my-bucket/Qwen-Image \
#     my-v5p-32 configs/grpo_t2i.py:qwen_image gs://my-bucket/runs/grpo1
#   launch/tpu_vm.sh --zone=us-east5-a --action=status my-v5p-32 configs/grpo_t2i.py:qwen_image \
#     gs://my-bucket/runs/grpo1
#
# options:
#   --zone=ZONE          TPU zone (default: gcloud's compute/zone)
#   --project=PROJECT    GCP project (default: gcloud's core/project)
#   --weights=gs://...   diffusers-format model directory, copied to every host's local disk
#                        (gcloud storage rsync, idempotent) and passed as --config.init_from
#   --commit=SHA         commit to run (default: this checkout's HEAD; it must be pushed)
#   --repo=URL           clone URL reachable from the hosts (default: remote.origin.url)
#   --run_name=NAME      names the logs and pid files (default: basename of WORKDIR)
#   --action=ACTION      run (default: setup, stage weights, start) | setup | stop | status
#   --dry_run            print the gcloud commands instead of running them
#
# Every host gets the same commit (checked out detached, then verified), a Python 3.11
# environment made by uv, and the same command; jax.distributed is initialised on every host
# (--config.distributed=always). Logs: ~/logs/NAME-worker<N>.log on each host.
# WORKDIR should be on GCS so that every host sees the same checkpoints.
#
# Why uv for Python 3.11: TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv5, v2-alpha-tpuv6e)
# ship Ubuntu 22.04 with Python 3.10. uv installs a standalone CPython 3.11 build into the user's
# home without root, apt or a PPA (deadsnakes needs sudo, add-apt-repository and python3.11-venv
# on every host, and breaks when the image's apt sources change), and it installs the wheels in
# parallel, which matters when 64 hosts install jax/tensorflow at once.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

ZONE="" PROJECT="" WEIGHTS="" COMMIT="" REPO="" RUN_NAME="" ACTION=run DRY_RUN=0
POSITIONAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --weights=*) WEIGHTS=${1#*=} ;;
    --commit=*) COMMIT=${1#*=} ;;
    --repo=*) REPO=${1#*=} ;;
    --run_name=*) RUN_NAME=${1#*=} ;;
    --action=*) ACTION=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
EXTRA=("$@")
[ ${#POSITIONAL[@]} -eq 3 ] || { echo "error: expected TPU_NAME CONFIG WORKDIR" >&2; usage; }
TPU_NAME=${POSITIONAL[0]} CONFIG=${POSITIONAL[1]} WORKDIR=${POSITIONAL[2]}
case "$ACTION" in run|setup|stop|status) ;; *) echo "error: --action=$ACTION" >&2; usage ;; esac

# The config file and variant must exist in this checkout (the hosts run the same commit).
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONFIG_FILE=${CONFIG%%:*}
VARIANT=${CONFIG#"$CONFIG_FILE"}; VARIANT=${VARIANT#:}
[ -f "$HERE/$CONFIG_FILE" ] || { echo "error: config file $CONFIG_FILE not found" >&2; exit 2; }
if [ -n "$VARIANT" ] && ! grep -q "\"$VARIANT\"" "$HERE/$CONFIG_FILE"; then
  echo "error: $CONFIG_FILE has no variant \"$VARIANT\"" >&2; exit 2
fi
case "$WEIGHTS" in ""|gs://*) ;; *) echo "error: --weights must be a gs:// path" >&2; exit 2 ;; esac

COMMIT=${COMMIT:-$(git -C "$HERE" rev-parse HEAD)}
REPO=${REPO:-$(git -C "$HERE" config --get remote.origin.url || true)}
if [ -z "$REPO" ]; then echo "error: no --repo and no remote.origin.url" >&2; exit 2; fi
if [ "$DRY_RUN" = 0 ] && [ -z "$(git -C "$HERE" branch -r --contains "$COMMIT" 2>/dev/null)" ]
then
  echo "error: commit $COMMIT is on no remote branch; push it so the hosts can fetch it" >&2
  exit 2
fi
RUN_NAME=${RUN_NAME:-$(basename "$WORKDIR")}

q() { printf '%q' "$1"; }  # quote one value for the remote shell
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes
WORKER="W=\$(curl -sf -m 5 -H Metadata-Flavor:Google $METADATA/agent-worker-number || hostname)"
LOGS="\$HOME/logs"
PIDFILE="$LOGS/$(q "$RUN_NAME").pid"

SETUP="set -euo pipefail
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
[ -d \$HOME/qwen_image_rl/.git ] || git clone -q $(q "$REPO") \$HOME/qwen_image_rl
cd \$HOME/qwen_image_rl
git fetch -q origin && git checkout -q --detach $(q "$COMMIT")
test \"\$(git rev-parse HEAD)\" = $(q "$COMMIT")
[ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv
uv pip install -q --python .venv/bin/python -c constraints.txt -e '.[tpu]'
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'"

LOCAL_WEIGHTS=""
STAGE=""
if [ -n "$WEIGHTS" ]; then
  LOCAL_WEIGHTS="\$HOME/weights/$(q "$(basename "$WEIGHTS")")"
  STAGE="set -euo pipefail
mkdir -p $LOCAL_WEIGHTS
gcloud storage rsync --recursive $(q "$WEIGHTS") $LOCAL_WEIGHTS"
fi

ARGS="--config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --config.distributed=always"
[ -z "$LOCAL_WEIGHTS" ] || ARGS="$ARGS --config.init_from=$LOCAL_WEIGHTS"
for a in ${EXTRA[@]+"${EXTRA[@]}"}; do ARGS="$ARGS $(q "$a")"; done

START="set -euo pipefail
$WORKER
mkdir -p $LOGS
if [ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then
  echo \"worker \$W: $(q "$RUN_NAME") is already running\" >&2; exit 1
fi
cd \$HOME/qwen_image_rl
test \"\$(git rev-parse HEAD)\" = $(q "$COMMIT")
LOG=$LOGS/$(q "$RUN_NAME")-worker\$W.log
setsid nohup .venv/bin/python -m qwen_image_rl.main $ARGS > \"\$LOG\" 2>&1 < /dev/null &
echo \$! > $PIDFILE
echo \"worker \$W: started pid \$(cat $PIDFILE), log \$LOG\""

STOP="$WORKER
if [ -f $PIDFILE ]; then kill -- -\"\$(cat $PIDFILE)\" 2>/dev/null || true; rm -f $PIDFILE; fi
echo \"worker \$W: stopped\""

STATUS="$WORKER
if [ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then S=running; else S=stopped; fi
echo \"worker \$W: \$S\"; tail -n 3 $LOGS/$(q "$RUN_NAME")-worker\$W.log 2>/dev/null || true"

GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all)
[ -z "$ZONE" ] || GCLOUD+=("--zone=$ZONE")
[ -z "$PROJECT" ] || GCLOUD+=("--project=$PROJECT")

on_all_hosts() {  # $1: a step name, $2: the script every host runs
  if [ "$DRY_RUN" = 1 ]; then
    printf '# step: %s\n' "$1"
    printf '%q ' "${GCLOUD[@]}"
    # shellcheck disable=SC2016  # printed for copy-paste, not expanded here
    printf -- '--command="$(cat <<'"'"'REMOTE'"'"'\n%s\nREMOTE\n)"\n' "$2"
  else
    echo "== $1 on all hosts of $TPU_NAME" >&2
    "${GCLOUD[@]}" --command="$2"
  fi
}

case "$ACTION" in
  setup) on_all_hosts setup "$SETUP" ;;
  run)
    on_all_hosts setup "$SETUP"
    [ -z "$STAGE" ] || on_all_hosts stage_weights "$STAGE"
    on_all_hosts start "$START" ;;
  stop) on_all_hosts stop "$STOP" ;;
  status) on_all_hosts status "$STATUS" ;;
esac
