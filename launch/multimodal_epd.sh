#!/usr/bin/env bash
# E/PD: frontend, encode, and one aggregated prefill+decode worker (no KV transfer).
# --decode-gpu pins the prefill+decode worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
start_on "$ENCODE_GPU" encode encode_worker "${FLAGS[@]}" "${WORKER_ARGS[@]}"
start_on "$DECODE_GPU" pd decode_worker "${FLAGS[@]}" --disaggregation-mode agg \
  --dedicated-mm-encoder "${WORKER_ARGS[@]}"
start_frontend E/PD
supervise
