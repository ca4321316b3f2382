#!/usr/bin/env bash
# Run one grouprank command on every worker of a TPU VM slice (or of several slices).
#
# Worked example: SFT of Qwen2.5-7B on a v5p-64 (8 workers x 4 chips):
#   gcloud compute tpus tpu-vm create grouprank-sft --zone us-east5-a \
#       --accelerator-type v5p-64 --version v2-alpha-tpuv5
#   grouprank plan --config configs/sft_qwen2.5-7b_v5p-64.yaml --topology v5p-64   # on a laptop
#   gcloud compute tpus tpu-vm ssh grouprank-sft --zone us-east5-a --worker=all \
#       --command "mkdir -p /tmp/gcs && gcsfuse --implicit-dirs my-bucket /tmp/gcs"
#   TPU_NAME=grouprank-sft ZONE=us-east5-a RUN_DIR=gs://my-bucket/runs/sft-7b \
#     launch/tpu_pod.sh --ref main -- \
#     grouprank sft --config configs/sft_qwen2.5-7b_v5p-64.yaml run_dir=/tmp/gcs/runs/sft-7b
#   The run directory is the bucket mounted at the same path on every worker (grouprank reads
#   and writes file-system paths; a gs:// run_dir is refused). Logs: ./logs/grouprank-sft/
#   worker-{0..7}.log here, and gs://my-bucket/runs/sft-7b/logs/ (RUN_DIR, copied with gsutil).
#
# Multi-slice (e.g. two v6e-256 slices, mesh.num_slices=2): create the slices as one queued
# resource (gcloud compute tpus queued-resources create ... --node-count 2), then
#   TPU_NAME=grouprank-rl ZONE=... RUN_DIR=gs://... launch/tpu_pod.sh --num-slices 2 -- grouprank grpo ...
# Slices talk over the data-centre network (DCN) through MEGASCALE_* variables that the TPU
# runtime sets from the queued resource; we add mesh.num_slices=N so the data axis is laid
# across slices (MeshConfig.num_slices) and only gradient all-reduces cross DCN.
#
# Options:
#   --ref REF          git ref to check out on every worker (default: the local HEAD commit)
#   --tarball          copy the local working tree instead of cloning (uncommitted changes)
#   --repo URL         git URL to clone (default: this checkout's origin)
#   --num-slices N     run on slices $TPU_NAME-0 .. $TPU_NAME-(N-1) and set mesh.num_slices=N
#   --skip-setup       reuse the venv already on the workers
# Environment: TPU_NAME, ZONE (required), PROJECT, RUN_DIR (gs:// path the worker logs are copied to).
#
# Each worker: clones/unpacks into ~/grouprank-jax, builds ~/grouprank-venv with
# `pip install -e .[tpu]`, then runs the command; jax.distributed.initialize() discovers the
# other workers from the TPU metadata (initialize_distributed does that when it sees the TPU
# environment), so no coordinator address is needed here.
set -euo pipefail

REF=""; TARBALL=0; REPO_URL=""; NUM_SLICES=1; SETUP=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ref) REF="$2"; shift 2 ;;
    --tarball) TARBALL=1; shift ;;
    --repo) REPO_URL="$2"; shift 2 ;;
    --num-slices) NUM_SLICES="$2"; shift 2 ;;
    --skip-setup) SETUP=0; shift ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (put the grouprank command after --)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [options] -- grouprank COMMAND [ARGS...]" >&2; exit 2; }
: "${TPU_NAME:?set TPU_NAME to the TPU VM (or queued-resource node prefix)}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
PROJECT_FLAG=(); [[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
HERE="$(cd "$(dirname "$0")/.." && pwd)"
REF="${REF:-$(git -C "$HERE" rev-parse HEAD)}"
REPO_URL="${REPO_URL:-$(git -C "$HERE" remote get-url origin 2>/dev/null || true)}"
CMD=("$@")
if ((NUM_SLICES > 1)); then CMD+=("mesh.num_slices=${NUM_SLICES}"); fi
QUOTED_CMD="$(printf '%q ' "${CMD[@]}")"

nodes=("$TPU_NAME")
if ((NUM_SLICES > 1)); then
  nodes=(); for ((s = 0; s < NUM_SLICES; s++)); do nodes+=("${TPU_NAME}-${s}"); done
fi

ssh_all() {  # ssh_all NODE COMMAND: the same command on every worker of NODE
  gcloud compute tpus tpu-vm ssh "$1" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$2"
}

if ((SETUP)); then
  if ((TARBALL)); then
    tarball="$(mktemp -t grouprank-XXXX).tar.gz"
    tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf "$tarball" .
    for node in "${nodes[@]}"; do
      gcloud compute tpus tpu-vm scp "$tarball" "$node":grouprank.tar.gz --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
    done
    fetch='rm -rf ~/grouprank-jax && mkdir -p ~/grouprank-jax && tar -xzf ~/grouprank.tar.gz -C ~/grouprank-jax'
  else
    [[ -n "$REPO_URL" ]] || { echo "$0: no git remote; pass --repo URL or --tarball" >&2; exit 2; }
    fetch="rm -rf ~/grouprank-jax && git clone -q $(printf %q "$REPO_URL") ~/grouprank-jax && git -C ~/grouprank-jax checkout -q $(printf %q "$REF")"
  fi
  setup="set -e; $fetch; python3 -m venv ~/grouprank-venv; ~/grouprank-venv/bin/pip install -q -U pip; \
~/grouprank-venv/bin/pip install -q -e ~/grouprank-jax[tpu]"
  for node in "${nodes[@]}"; do ssh_all "$node" "$setup" & done
  wait
fi

mkdir -p "logs/${TPU_NAME}"
# Every worker prefixes its lines with its hostname and keeps its own log, copied to RUN_DIR so
# it survives a dropped ssh session; the local per-worker files are split from the ssh streams.
run="cd ~/grouprank-jax && source ~/grouprank-venv/bin/activate && \
log=/tmp/grouprank-\$(hostname).log && ( ${QUOTED_CMD} ) 2>&1 | sed -u \"s/^/[\$(hostname)] /\" | tee \$log; \
rc=\${PIPESTATUS[0]}; [ -n '${RUN_DIR:-}' ] && gsutil -q cp \$log '${RUN_DIR:-}/logs/' || true; exit \$rc"
status=0
for node in "${nodes[@]}"; do
  ssh_all "$node" "$run" > "logs/${TPU_NAME}/${node}.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=$?; done
# Split each node's stream into one file per worker (lines carry the worker's hostname).
for node in "${nodes[@]}"; do
  awk -v dir="logs/${TPU_NAME}" 'match($0, /^\[[^]]+\]/) { f = dir "/" substr($0, 2, RLENGTH - 2) ".log"; print > f }' \
    "logs/${TPU_NAME}/${node}.log"
done
echo "logs in logs/${TPU_NAME}/ (per worker by hostname)${RUN_DIR:+ and ${RUN_DIR}/logs/}; exit status $status"
exit "$status"
