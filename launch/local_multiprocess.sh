#!/usr/bin/env bash
# Run one command as N JAX processes on this machine, each with D CPU devices: a real
# multi-process job (gloo collectives) for testing multi-host code paths without a pod.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 4 grouprank sft --config configs/sft_tiny.yaml
#   launch/local_multiprocess.sh 2 4 python my_script.py
#
# Each process gets GROUPRANK_COORDINATOR / GROUPRANK_NUM_PROCESSES / GROUPRANK_PROCESS_ID
# (read by grouprank_jax.parallel.distributed.initialize_distributed) plus JAX_PLATFORMS=cpu
# and JAX_NUM_CPU_DEVICES. Output lines are prefixed with "[pN]". Exits with the first
# non-zero status of any process, and stops the others then (a lone survivor would hang in
# its next collective).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
NUM="$1"; DEVICES="$2"; shift 2
if ! [[ "$NUM" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers (got '$NUM' '$DEVICES')" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
# Ask the kernel for a free port rather than guessing one; another job may hold any fixed port.
PORT="${GROUPRANK_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < NUM; i++)); do
  (
    export GROUPRANK_COORDINATOR="127.0.0.1:${PORT}" GROUPRANK_NUM_PROCESSES="$NUM" GROUPRANK_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$DEVICES"
    unset XLA_FLAGS  # a forced host device count would override JAX_NUM_CPU_DEVICES
    exec "$@" 2>&1 | sed -u "s/^/[p${i}] /"
    # pipefail makes the subshell's status the command's, not sed's
  ) &
  pids+=("$!")
done

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  # wait -n returns as soon as any process ends, so a crash stops the rest promptly.
  if wait -n; then
    remaining=$((remaining - 1))
  else
    rc=$?
    status=$rc
    echo "[launcher] a process exited with status $rc; stopping the others" >&2
    cleanup
    wait || true
    break
  fi
done
exit "$status"
