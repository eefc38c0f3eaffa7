#!/usr/bin/env bash
# P/D: frontend, prefill and decode (text-only models; a VLM's images are encoded in prefill).
# The KV cache moves prefill -> decode.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
start_on "$PREFILL_GPU" prefill prefill_worker "${FLAGS[@]}" "${WORKER_ARGS[@]}"
start_on "$DECODE_GPU" decode decode_worker "${FLAGS[@]}" --disaggregation-mode decode \
  "${WORKER_ARGS[@]}"
start_frontend P/D
supervise
