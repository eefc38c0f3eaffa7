"""Starting and stopping a topology with its launch script, for the benchmarks."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"triptych is serving on http://[^:]+:([0-9]+) ")


def launch(
    script: str,
    args: list[str],
    log: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    own_session: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``launch/<script> args... --http-port 0`` until it says it serves (it does so once
    ``/ready`` answers 200); returns the launcher and the frontend's base URL. Without `env`
    the script starts a private NATS; with one that sets NATS_URL, the stack joins that.

    The stack runs in a process group of its own, and by default in a session of its own, as
    a service would; `own_session` False keeps it in the caller's session. On Linux that
    decides how it shares the CPU with the caller: the scheduler's autogroups divide the CPU
    fairly between sessions first, then between the processes within each."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    split = args.index("--") if "--" in args else len(args)  # worker flags follow "--"
    command = [*args[:split], "--http-port", "0", *args[split:]]
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "launch" / script), *command],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=own_session,
        process_group=None if own_session else 0,
    )
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        if launcher.poll() is not None:
            break
        serving = SERVING.search(log.read_text(errors="replace"))
        if serving:
            return launcher, f"http://127.0.0.1:{serving[1]}"
        time.sleep(0.2)
    stop(launcher)
    raise RuntimeError(f"{script} did not become ready:\n{log.read_text()[-3000:]}")


def stop(launcher: subprocess.Popen[bytes]) -> None:
    """SIGTERM the launcher (it stops the workers first, NATS last); SIGKILL if it hangs."""
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
