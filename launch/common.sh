# Shared by the launch scripts: each is `triptych serve --topology T` with the flags it is given
# (see `triptych serve --help`). Sourced, not run.
#
# PYTHON=<venv>/bin/python runs the stack with that interpreter (.venv-sglang for sglang);
# by default the project's .venv. Everything else -- a private nats-server when NATS_URL is
# unset, the serving line once /ready says 200, the orderly stop on Ctrl-C or SIGTERM, the
# watchdog that cleans up after a SIGKILL -- is triptych serve's.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# nats-server and friends: next to the interpreter first (PYTHON=.venv-sglang/bin/python)
export PATH="$(dirname "$PYTHON"):$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

# serve TOPOLOGY ARGS...: become `triptych serve` for that topology.
serve() {
  local topology="$1"; shift
  exec "$PYTHON" -m triptych serve --topology "$topology" "$@"
}
