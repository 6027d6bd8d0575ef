#!/usr/bin/env bash
# All workers of a Cloud TPU VM slice run the same command; jax.distributed finds the
# coordinator, process count and id from the TPU environment (--distributed).
#
#   TPU=my-v5e-32 ZONE=us-west4-a scripts/launch_tpu_vm.sh --preset gpt2 \
#       --data /mnt/shared/prepared/web --mesh fsdp=-1 --out /mnt/shared/runs/gpt2
#
# Needs gptjax installed on every worker (`pip install gptjax` or this repo) and --data /
# --out on storage all workers see (checkpoints are written by all processes together).
# Compared with one host, only the launcher and the --mesh flag change.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all \
  --command "gptjax train --distributed${args}"
