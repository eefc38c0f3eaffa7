"""Running a stack's processes: a private NATS, the components, and their orderly end.

Every process started here is stopped when the supervisor stops (SIGTERM, SIGINT), when any
component exits, or, should the supervisor be killed outright, by its watchdog. Components
drain first (they need NATS to finish requests in flight); NATS stops last. Components and
NATS run in process groups of their own: a terminal's Ctrl-C reaches the supervisor alone,
which then stops them in that order.
"""

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from triptych.runtime.env import Env
from triptych.runtime.nats_server import NatsServer
from triptych.runtime.port_file import read_port_file

POLL_S = 0.2


def say(line: str) -> None:
    """A line for the person at the terminal."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class Child:
    """One component process."""

    name: str
    popen: subprocess.Popen[bytes]


class Supervisor:
    """Starts processes, watches them, and stops them all."""

    def __init__(self, python: str, stop_grace_s: float) -> None:
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.run_dir = Path(tempfile.mkdtemp(prefix="triptych-serve-"))
        self.children: list[Child] = []
        self.nats: NatsServer | None = None
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        """The environment of every component (NATS_URL and NATS_TOKEN once known)."""
        self._stop = threading.Event()
        self._watchdog: subprocess.Popen[bytes] | None = None

    def catch_signals(self) -> None:
        """SIGINT and SIGTERM ask the stack to stop (`stopping` turns true)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self._stop.is_set():
                say("stopping triptych...")
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    @property
    def stopping(self) -> bool:
        """Whether a signal asked the stack to stop."""
        return self._stop.is_set()

    def start_watchdog(self) -> None:
        """The process that cleans up if this one is killed outright (own session)."""
        self._watchdog = subprocess.Popen(
            [self.python, "-m", "triptych.cli.watchdog", str(os.getpid()), str(self.run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start_nats(self) -> None:
        """Join ``NATS_URL`` if set; otherwise start a private nats-server on a free loopback
        port, guarded by a fresh token that only the components get (through NATS_TOKEN)."""
        url = Env.read().nats_url
        if url:
            say(f"using NATS at {url}")
            return
        token = secrets.token_urlsafe(24)
        self.nats = NatsServer(token=token, workdir=self.run_dir / "nats", own_session=True)
        self.nats.start()
        (self.run_dir / "nats.pid").write_text(json.dumps([self.nats.pid]))
        token_file = self.run_dir / "nats.token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        self.env.update(NATS_URL=self.nats.url, NATS_TOKEN=token)
        say(f"private nats-server at {self.nats.url} (token in {token_file})")

    def start(
        self, name: str, module: str, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        """Run ``python -m triptych.components.<module> args`` in the background."""
        popen = subprocess.Popen(
            [self.python, "-m", f"triptych.components.{module}", *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        self.children.append(Child(name, popen))
        (self.run_dir / "pids").write_text(json.dumps([c.popen.pid for c in self.children]))
        gpu = (env or {}).get("CUDA_VISIBLE_DEVICES")
        pinned = f" on GPU {gpu}" if gpu else ""
        say(f"started {name}{pinned} (pid {popen.pid})")

    def exited(self) -> tuple[str, int] | None:
        """The first component found exited, with its status (128 + signal when killed)."""
        for child in self.children:
            status = child.popen.poll()
            if status is not None:
                return child.name, status if status >= 0 else 128 - status
        if self.nats is not None and self.nats.pid is not None:
            try:
                os.kill(self.nats.pid, 0)
            except ProcessLookupError:
                return "nats-server", 1
        return None

    def wait_ready(self, port_file: Path, host: str) -> int | None:
        """The frontend's port once it announced it and its ``/ready`` answers 200; None if a
        process exited or a signal came first."""
        port = 0
        while not self.stopping and self.exited() is None:
            if not port:
                ports = read_port_file(port_file)
                port = ports["http"] if ports else 0
            if port and _ready(host, port):
                return port
            self._stop.wait(POLL_S)
        return None

    def wait(self) -> int:
        """Block until a signal (0) or a component's exit (its status)."""
        while not self.stopping:
            gone = self.exited()
            if gone is not None:
                name, status = gone
                say(f"a triptych process exited ({name}, status {status}); stopping the stack")
                return status or 1
            self._stop.wait(POLL_S)
        return 0

    def stop(self) -> None:
        """Components first (SIGTERM, then SIGKILL after the grace), NATS last. Safe to call
        twice."""
        if self._watchdog is not None:
            self._watchdog.terminate()
            self._watchdog.wait()
            self._watchdog = None
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for child in self.children:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop within {self.stop_grace_s:g}s; killing it")
                child.popen.kill()
                child.popen.wait()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _ready(host: str, port: int) -> bool:
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    connection = http.client.HTTPConnection(target, port, timeout=2)
    try:
        connection.request("GET", "/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
