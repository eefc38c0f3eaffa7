#!/usr/bin/env bash
# EPD: frontend and one worker that encodes, prefills and decodes (the smallest footprint).
# --gpus 0,1,... starts one independent worker per listed GPU behind the same frontend.
# Same as `triptych serve --topology epd`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
serve epd "$@"
