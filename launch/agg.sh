#!/usr/bin/env bash
# EPD: frontend and one worker that encodes, prefills and decodes (the smallest footprint).
# --gpus 0,1,... starts one independent worker per listed GPU behind the same frontend.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
if [[ -n "$GPUS" ]]; then
  IFS=, read -ra GPU_LIST <<<"$GPUS"
  for gpu in "${GPU_LIST[@]}"; do
    start_on "$gpu" "worker-gpu$gpu" decode_worker "${FLAGS[@]}" --disaggregation-mode agg \
      "${WORKER_ARGS[@]}"
  done
else
  start worker decode_worker "${FLAGS[@]}" --disaggregation-mode agg "${WORKER_ARGS[@]}"
fi
start_frontend EPD
supervise
