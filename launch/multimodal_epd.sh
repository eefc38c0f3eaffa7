#!/usr/bin/env bash
# E/PD: frontend, encode, and one aggregated prefill+decode worker (no KV transfer).
# --decode-gpu pins the prefill+decode worker. Same as `triptych serve --topology e/pd`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
serve e/pd "$@"
