"""Starting and stopping a topology with its launch script, for the benchmarks."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    script: str, args: list[str], port: int, log: Path, timeout: float = 300
) -> subprocess.Popen[bytes]:
    """Run ``launch/<script> args... --http-port port`` and wait until ``/ready`` says 200."""
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    split = args.index("--") if "--" in args else len(args)  # worker flags follow "--"
    command = [*args[:split], "--http-port", str(port), *args[split:]]
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "launch" / script), *command],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/ready"
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        if launcher.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return launcher
        except httpx.HTTPError:
            pass
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
