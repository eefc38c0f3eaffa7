"""``python -m triptych.cli.watchdog SUPERVISOR_PID RUN_DIR``: cleans up after a killed stack.

A supervisor killed with SIGKILL runs no code of its own. This process, in a session of its
own, waits for it to vanish and then stops what it started, as the supervisor would have:
the components (their pids in ``RUN_DIR/pids``) first, NATS (``RUN_DIR/nats.pid``) last; all
gone within 10 s. A supervisor that stops normally ends its watchdog first.
Only the standard library: it must start in a blink.
"""

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

COMPONENT_GRACE_S = 6.0
NATS_GRACE_S = 2.0
POLL_S = 0.2


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def stop(pids: list[int], grace_s: float) -> None:
    """SIGTERM `pids`, then SIGKILL whatever still runs after `grace_s`."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(POLL_S)
    for pid in pids:
        if alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(pid) for pid in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError):
        return []


def main() -> None:
    """Wait for the supervisor to vanish, then stop its processes and remove its run dir."""
    supervisor, run_dir = int(sys.argv[1]), Path(sys.argv[2])
    while alive(supervisor):
        time.sleep(POLL_S)
    stop(_read_pids(run_dir / "pids"), COMPONENT_GRACE_S)
    stop(_read_pids(run_dir / "nats.pid"), NATS_GRACE_S)
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
