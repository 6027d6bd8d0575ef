#!/usr/bin/env bash
# Several gptjax processes on this machine, each with simulated CPU devices, training as one
# job through jax.distributed (CPU collectives over gloo). It really runs: a rehearsal of
# a multi-host launch on one laptop.
#
#   scripts/launch_local_cpu.sh [PROCESSES] [DEVICES_PER_PROCESS] -- [gptjax train flags...]
#   scripts/launch_local_cpu.sh 2 4 -- --preset tiny --batch-size 16 --max-steps 50 --warmup-steps 5 \
#       --out runs/local-mp
#
# The mesh defaults to data parallelism over all PROCESSES x DEVICES devices; pass --mesh
# to change it (the only flag that differs from a one-process run). Ctrl-C stops every
# process at one step, saved; rerunning the same command resumes there.
set -euo pipefail
procs=${1:-2}; devices=${2:-4}
shift $(( $# >= 2 ? 2 : $# )); [[ "${1:-}" == "--" ]] && shift
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu
pids=()
signalled=0
# Background children of a script ignore Ctrl-C. Pass it (and a SIGTERM) on as the
# preemption notice: every process stops at one agreed step and saves it (parallel/preemption.py).
# Set before the children start, so none is left behind by an early Ctrl-C.
trap 'signalled=1; kill -TERM ${pids[@]+"${pids[@]}"} 2>/dev/null || true' INT TERM
for ((i = 0; i < procs; i++)); do
  gptjax train --coordinator "127.0.0.1:${port}" --num-processes "${procs}" --process-id "${i}" \
    "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do
    signalled=0
    wait "${pid}" && rc=0 || rc=$?
    (( signalled )) || break  # else a trapped signal ended the wait; bash keeps the child's status
  done
  (( rc == 0 )) || status=${rc}
done
exit "${status}"
