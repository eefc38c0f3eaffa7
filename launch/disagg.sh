#!/usr/bin/env bash
# P/D: frontend, prefill and decode (text-only models; a VLM's images are encoded in prefill).
# The KV cache moves prefill -> decode. Same as `triptych serve --topology p/d`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
serve p/d "$@"
