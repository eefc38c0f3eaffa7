#!/usr/bin/env bash
# E/P/D: frontend, encode, decode (the entry point of disaggregation) and prefill, each its own
# process, meeting on NATS. Embeddings go encode -> prefill; the KV cache prefill -> decode.
# Same as `triptych serve --topology e/p/d`; `--help` lists every flag.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
serve e/p/d "$@"
