#!/usr/bin/env bash
# P/D: frontend, prefill and decode (text-only models; the KV cache moves prefill -> decode).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
start prefill prefill_worker "${FLAGS[@]}" "${WORKER_ARGS[@]}"
start decode decode_worker "${FLAGS[@]}" --disaggregation-mode decode "${WORKER_ARGS[@]}"
start frontend frontend --model-path "$MODEL_PATH" --topology P/D \
  --http-host "$HTTP_HOST" --http-port "$HTTP_PORT"
supervise
