# Shared by the launch scripts: flags, a private nats-server, process supervision.
# Sourced, not run. Every process started here is stopped on Ctrl-C, SIGTERM or exit.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# nats-server and friends: next to the interpreter first (PYTHON=.venv-sglang/bin/python)
export PATH="$(dirname "$PYTHON"):$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

ENGINE=hf
ENCODE_ENGINE=""
MODEL_PATH=""
HTTP_HOST=127.0.0.1
HTTP_PORT=8000
DEVICE=cpu
ENCODE_GPU="${TRIPTYCH_ENCODE_GPU:-}"
PREFILL_GPU="${TRIPTYCH_PREFILL_GPU:-}"
DECODE_GPU="${TRIPTYCH_DECODE_GPU:-}"
GPUS="${TRIPTYCH_GPUS:-}"
ENCODE_MEM=""
PREFILL_MEM=""
DECODE_MEM=""
WORKER_ARGS=()
PIDS=()
NATS_PID=""
WATCHDOG_PID=""
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/triptych-launch.XXXXXX")"

usage() {
  cat <<USAGE
usage: $(basename "$0") [--engine hf|mock|sglang] [--encode-engine hf|mock|sglang]
                        [--model-path P] [--http-port N (0: any)]
                        [--http-host H] [--device D] [--encode-gpu N] [--prefill-gpu N]
                        [--decode-gpu N] [--gpus N,M,...]
                        [--encode-mem-fraction-static F] [--prefill-mem-fraction-static F]
                        [--decode-mem-fraction-static F] [-- extra worker flags...]
Starts a private nats-server on a free loopback port when NATS_URL is unset.
--engine runs prefill and decode, --encode-engine the encoding (default: --engine).
PYTHON=<venv>/bin/python runs every process with that interpreter (.venv-sglang for sglang).
--encode-gpu/--prefill-gpu/--decode-gpu (or TRIPTYCH_ENCODE_GPU, ...) pin a stage to one GPU
(its process sees only that GPU, and --device becomes cuda); a list starts one worker per
entry (--encode-gpu 0,0,1: two encoders on GPU 0, one on GPU 1). agg.sh --gpus 0,1 starts one
independent worker per listed GPU. --STAGE-mem-fraction-static gives that stage's workers
their share of a GPU they share (python -m triptych.components.planner plan prints a split).
USAGE
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --engine) ENGINE="$2"; shift 2 ;;
      --encode-engine) ENCODE_ENGINE="$2"; shift 2 ;;
      --model-path) MODEL_PATH="$2"; shift 2 ;;
      --http-port) HTTP_PORT="$2"; shift 2 ;;
      --http-host) HTTP_HOST="$2"; shift 2 ;;
      --device) DEVICE="$2"; shift 2 ;;
      --encode-gpu) ENCODE_GPU="$2"; shift 2 ;;
      --prefill-gpu) PREFILL_GPU="$2"; shift 2 ;;
      --decode-gpu) DECODE_GPU="$2"; shift 2 ;;
      --gpus) GPUS="$2"; shift 2 ;;
      --encode-mem-fraction-static) ENCODE_MEM="$2"; shift 2 ;;
      --prefill-mem-fraction-static) PREFILL_MEM="$2"; shift 2 ;;
      --decode-mem-fraction-static) DECODE_MEM="$2"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; WORKER_ARGS+=("$@"); break ;;
      *) echo "unknown flag: $1" >&2; usage >&2; exit 2 ;;
    esac
  done
  ENCODE_ENGINE="${ENCODE_ENGINE:-$ENGINE}"
  local engine
  for engine in "$ENGINE" "$ENCODE_ENGINE"; do
    case "$engine" in hf|mock|sglang) ;; *) echo "unknown engine: $engine" >&2; exit 2 ;; esac
  done
  if [[ -z "$MODEL_PATH" ]]; then
    MODEL_PATH="$("$PYTHON" -c 'from triptych.models.tiny import default_model_path; print(default_model_path())')"
  fi
}

# Components drain first (they need NATS to finish in-flight requests), then NATS stops.
stop_all() {
  trap - INT TERM EXIT
  if [[ -n "$WATCHDOG_PID" ]]; then kill -TERM -- "-$WATCHDOG_PID" 2>/dev/null || true; fi
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + ${TRIPTYCH_STOP_GRACE_S:-35}))
  for pid in "${PIDS[@]}" $NATS_PID; do
    if [[ "$pid" == "$NATS_PID" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$RUN_DIR"
}

on_signal() {
  echo "stopping triptych..." >&2
  stop_all
  exit 0
}

# A launcher killed with SIGKILL cannot clean up: a watchdog in a session of its own notices
# and stops what it started (workers first, then NATS; all gone within 10 s).
start_watchdog() {
  setsid bash -c '
    tail --pid="$1" -s 0.2 -f /dev/null
    read -ra workers <"$2/pids" 2>/dev/null
    kill -TERM "${workers[@]}" 2>/dev/null
    for _ in $(seq 30); do kill -0 "${workers[@]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "${workers[@]}" 2>/dev/null
    if [[ -s "$2/nats.pid" ]]; then
      nats=$(<"$2/nats.pid")
      kill -TERM "$nats" 2>/dev/null
      for _ in $(seq 10); do kill -0 "$nats" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$nats" 2>/dev/null
    fi
    rm -rf "$2"' watchdog "$$" "$RUN_DIR" </dev/null >/dev/null 2>&1 &
  WATCHDOG_PID=$!
}

start_nats() {
  trap on_signal INT TERM
  trap stop_all EXIT
  start_watchdog
  if [[ -n "${NATS_URL:-}" ]]; then
    echo "using NATS at $NATS_URL" >&2
    return
  fi
  # Its own session: Ctrl-C in a terminal signals the whole foreground group, and NATS must
  # outlive the workers' drain; stop_all ends it last.
  # A fresh token guards the private server; components read it from NATS_TOKEN. Messages
  # stay within a stock server's 1 MB: large images move from the frontend on NIXL.
  NATS_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  export NATS_TOKEN
  (umask 077 && printf 'listen: "127.0.0.1:-1"\nmax_payload: 1048576\nauthorization { token: "%s" }\n' \
    "$NATS_TOKEN" >"$RUN_DIR/nats.conf")
  setsid nats-server -c "$RUN_DIR/nats.conf" -ports_file_dir "$RUN_DIR" >"$RUN_DIR/nats.log" 2>&1 &
  NATS_PID=$!
  echo "$NATS_PID" >"$RUN_DIR/nats.pid"
  local ports=""
  for _ in $(seq 1 500); do
    ports=$(ls "$RUN_DIR"/*.ports 2>/dev/null | head -n1 || true)
    [[ -n "$ports" ]] && break
    sleep 0.01
  done
  if [[ -z "$ports" ]]; then echo "nats-server did not start" >&2; cat "$RUN_DIR/nats.log" >&2; exit 1; fi
  NATS_URL="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["nats"][0])' "$ports")"
  export NATS_URL
  (umask 077 && printf '%s\n' "$NATS_TOKEN" >"$RUN_DIR/nats.token")
  echo "private nats-server at $NATS_URL (token in $RUN_DIR/nats.token)" >&2
}

# start NAME MODULE FLAGS...: run one component in the background.
start() {
  local name="$1" module="$2"; shift 2
  "$PYTHON" -m "triptych.components.$module" "$@" &
  PIDS+=($!)
  echo "${PIDS[*]}" >"$RUN_DIR/pids"
  echo "started $name (pid $!)" >&2
}

# start_on GPU NAME MODULE FLAGS...: like start, pinned to one GPU when GPU is not empty.
start_on() {
  local gpu="$1" name="$2" module="$3"; shift 3
  if [[ -z "$gpu" ]]; then
    start "$name" "$module" "$@"
    return
  fi
  CUDA_VISIBLE_DEVICES="$gpu" "$PYTHON" -m "triptych.components.$module" "$@" --device cuda &
  PIDS+=($!)
  echo "${PIDS[*]}" >"$RUN_DIR/pids"
  echo "started $name on GPU $gpu (pid $!)" >&2
}

# start_each GPU_LIST MEM_FRACTION NAME MODULE FLAGS...: one worker per entry of GPU_LIST
# (one unpinned worker when it is empty), each with --mem-fraction-static when given.
start_each() {
  local list="$1" mem="$2" name="$3" module="$4"; shift 4
  local budget=()
  [[ -n "$mem" ]] && budget=(--mem-fraction-static "$mem")
  if [[ -z "$list" ]]; then
    start_on "" "$name" "$module" "$@" "${budget[@]}"
    return
  fi
  local gpus gpu index=0
  IFS=, read -ra gpus <<<"$list"
  for gpu in "${gpus[@]}"; do
    start_on "$gpu" "$name-$index" "$module" "$@" "${budget[@]}"
    index=$((index + 1))
  done
}

worker_flags() {
  echo --engine "$ENGINE" --encode-engine "$ENCODE_ENGINE" --model-path "$MODEL_PATH" \
    --device "$DEVICE"
}

# start_frontend TOPOLOGY: the frontend, on --http-port (0: a free port, announced in a file).
start_frontend() {
  start frontend frontend --model-path "$MODEL_PATH" --topology "$1" \
    --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" --port-file "$RUN_DIR/frontend.port"
}

# ready_on PORT: whether the frontend's /ready answers 200 (HTTP over bash's /dev/tcp).
ready_on() {
  local host="$HTTP_HOST" fd line=""
  [[ "$host" == 0.0.0.0 ]] && host=127.0.0.1
  { exec {fd}<>"/dev/tcp/$host/$1"; } 2>/dev/null || return 1
  printf 'GET /ready HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&"$fd"
  read -r -t 2 line <&"$fd" || true
  exec {fd}>&-
  [[ "$line" == *" 200 "* ]]
}

# Wait until the frontend announced its port and every stage is ready; 1 if a process exited.
await_ready() {
  local pid port=""
  while :; do
    for pid in "${PIDS[@]}" $NATS_PID; do kill -0 "$pid" 2>/dev/null || return 1; done
    if [[ -z "$port" && -s "$RUN_DIR/frontend.port" ]]; then
      port="$(sed -E 's/.*"http": *([0-9]+).*/\1/' "$RUN_DIR/frontend.port")"
    fi
    if [[ -n "$port" ]] && ready_on "$port"; then
      HTTP_PORT="$port"
      return 0
    fi
    sleep 0.2
  done
}

# Say where triptych serves once it answers, then block until a signal arrives or any component
# exits (then stop the rest and fail).
supervise() {
  set +e
  if await_ready; then
    echo "triptych is serving on http://$HTTP_HOST:$HTTP_PORT (Ctrl-C to stop)" >&2
  fi
  wait -n "${PIDS[@]}" $NATS_PID
  local status=$?
  echo "a triptych process exited (status $status); stopping the stack" >&2
  stop_all
  exit "$status"
}
