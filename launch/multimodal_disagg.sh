#!/usr/bin/env bash
# E/P/D: frontend, encode, decode (the entry point of disaggregation) and prefill, each its own
# process, meeting on NATS. Embeddings go encode -> prefill; the KV cache prefill -> decode.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
start_nats
read -ra FLAGS <<<"$(worker_flags)"
start_each "$ENCODE_GPU" "$ENCODE_MEM" encode encode_worker "${FLAGS[@]}" "${WORKER_ARGS[@]}"
start_each "$PREFILL_GPU" "$PREFILL_MEM" prefill prefill_worker "${FLAGS[@]}" \
  --dedicated-mm-encoder "${WORKER_ARGS[@]}"
start_each "$DECODE_GPU" "$DECODE_MEM" decode decode_worker "${FLAGS[@]}" \
  --disaggregation-mode decode --dedicated-mm-encoder "${WORKER_ARGS[@]}"
start_frontend E/P/D
supervise
