"""Several frontend processes behind one HTTP port (``--frontend-processes N``).

One Python process parses, templates, tokenizes and frames SSE on one core; at a few thousand
streamed requests a second that core is the ceiling, whatever the workers behind it can do.
Dynamo's frontend runs on every core; vLLM has ``--api-server-count``. Here the process started
by the user (the *leader*) binds the port with ``SO_REUSEPORT`` and starts ``N - 1`` *followers*
with its own flags, which bind the same port: the kernel spreads new connections over the
processes. Each is a whole frontend with its own NATS connection, discovery and transfer agent,
so nothing is shared and nothing is locked.

What must still look like one server:

- ``/metrics`` on any process is the sum over the group (`observability.metrics.merge`): each
  process also serves its own registry on a private loopback port, announced as
  ``<pid>.json`` in the group's directory, and the one asked fetches the others';
- ``/ready`` answers 200 only once every process of the group has announced itself;
- ``--max-inflight-requests`` and the decode instances' capacity are shared out: each process
  takes its part (rounded up) before answering 503;
- SIGTERM (or Ctrl-C) to the leader drains the followers with it; a follower that dies is
  started again; a follower whose leader died stops.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triptych.components.frontend.http import HttpServer, Request, Response
from triptych.components.frontend.middleware import refusal
from triptych.observability import metrics
from triptych.runtime.port_file import write_port_file

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
"""A process that does not hand over its metrics within this long is left out of the sum."""
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
"""Waits before starting a follower again after each of its deaths in a row (then the last)."""
STEADY_S = 30.0
"""A follower that lived this long starts its backoff over when it dies."""
_WATCH_PARENT_S = 0.5


class Group:
    """This process's membership of a frontend group: its announced metrics port, and the view
    of the others."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self._server = HttpServer(self._own_metrics, refusal, max_body_bytes=0)
        self._announcement = directory / f"{os.getpid()}.json"
        self._watch: asyncio.Task[None] | None = None
        self._orphaned = False

    async def join(self, stop: asyncio.Event | None) -> None:
        """Serve this process's metrics on loopback and announce the port; a follower passes
        its `stop`, set when the leader is gone."""
        port = await self._server.listen("127.0.0.1", 0, backlog=64)
        write_port_file(self._announcement, {"metrics": port})
        if stop is not None:
            self._watch = asyncio.create_task(self._watch_leader(stop))

    async def leave(self) -> None:
        """Withdraw the announcement (the whole directory, when the leader died without
        removing it); stop serving metrics."""
        if self._watch is not None:
            self._watch.cancel()
        self._announcement.unlink(missing_ok=True)
        if self._orphaned:
            shutil.rmtree(self.directory, ignore_errors=True)
        await self._server.close(0)

    async def _watch_leader(self, stop: asyncio.Event) -> None:
        """Set `stop` when this process's parent, the group's leader, is gone."""
        parent = os.getppid()
        while True:  # no event tells of it: polled
            await asyncio.sleep(_WATCH_PARENT_S)
            if os.getppid() != parent:
                break
        log.warning("the frontend group's leader is gone: stopping")
        self._orphaned = True
        stop.set()

    def share(self, limit: int) -> int:
        """This process's part of a limit meant for the whole group."""
        return math.ceil(limit / self.size)

    def members(self) -> dict[int, int]:
        """Metrics port of every process announced, by pid (this one's included)."""
        found: dict[int, int] = {}
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                found[int(path.stem)] = int(json.loads(path.read_text())["metrics"])
        return found

    async def metrics(self) -> bytes:
        """The group's metrics: this process's and every other one's that answers, summed."""
        others = [port for pid, port in self.members().items() if pid != os.getpid()]
        fetched = await asyncio.gather(*(_fetch_metrics(port) for port in others))
        return metrics.merge([generate_latest(), *(text for text in fetched if text)])

    async def _own_metrics(self, request: Request) -> Response:
        return Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST)


async def _fetch_metrics(port: int) -> bytes | None:
    """Another process's own metrics; None when it does not answer in time."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: group\r\nConnection: close\r\n\r\n")
                answer = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else None


class Followers:
    """The leader's children: ``N - 1`` frontends started with the leader's flags, bound to the
    port the leader bound, kept running until `stop`."""

    def __init__(self, argv: Sequence[str], port: int, size: int) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="triptych-frontend-"))
        self._argv = [
            sys.executable,
            "-m",
            "triptych.components.frontend",
            *argv,
            "--http-port",
            str(port),
            "--port-file",
            "",
            "--frontend-processes",
            str(size),
            "--frontend-group",
            str(self.directory),
        ]
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._keepers = [asyncio.ensure_future(self._keep(index)) for index in range(size - 1)]
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        """Followers running now."""
        return [process.pid for process in self._processes.values()]

    async def _keep(self, index: int) -> None:
        """Run follower `index`; start it again, after a growing wait, each time it dies."""
        loop = asyncio.get_running_loop()
        deaths = 0
        while not self._stopping:
            started = loop.time()
            process = await asyncio.create_subprocess_exec(*self._argv)
            self._processes[index] = process
            status = await process.wait()
            if self._stopping:
                return
            deaths = 1 if loop.time() - started > STEADY_S else deaths + 1
            wait = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
            log.warning(
                "frontend process %d exited with status %s: starting another in %gs",
                process.pid,
                status,
                wait,
            )
            (self.directory / f"{process.pid}.json").unlink(missing_ok=True)
            await asyncio.sleep(wait)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every follower (each drains its requests within `grace_s`), SIGKILL those
        still running after it, and remove the group's directory."""
        self._stopping = True
        for keeper in self._keepers:
            keeper.cancel()
        running = [p for p in self._processes.values() if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=grace_s + 5
            )
            for process in running:
                if process.returncode is None:
                    log.warning("frontend process %d did not stop: killed", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late)
        shutil.rmtree(self.directory, ignore_errors=True)
