#!/usr/bin/env bash
# EPD: frontend and one worker that encodes, prefills and decodes (the smallest footprint).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
start worker decode_worker "${FLAGS[@]}" --disaggregation-mode agg "${WORKER_ARGS[@]}"
start frontend frontend --model-path "$MODEL_PATH" --topology EPD \
  --http-host "$HTTP_HOST" --http-port "$HTTP_PORT"
supervise
