"""The one entry shape of every component: config → runtime + engine + handler → serve → drain.

`serve` runs a component's `main` coroutine on uvloop, turns SIGTERM/SIGINT into a graceful
drain, and exits non-zero if start-up fails or the control plane is lost for good.
"""

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from triptych.observability import logs as observability_logs
from triptych.runtime.runtime import Runtime

EXIT_NATS_LOST = 3
"""Exit status of a process that could not reach NATS within its reconnect window."""


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Plain-text (or JSON-lines) logs on stderr, each line tagged with its request id."""
    observability_logs.configure_logging(level, fmt)


async def serving(stop: asyncio.Event, runtime: Runtime) -> int:
    """Wait until `stop` is set (0) or `runtime` lost NATS for good (`EXIT_NATS_LOST`)."""
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(runtime.lost.wait())
    try:
        await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        lost.cancel()
    return EXIT_NATS_LOST if runtime.lost.is_set() and not stop.is_set() else 0


def serve(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> None:
    """Run `main(stop)` until it returns, then exit with the status it returns; `stop` is set
    by SIGTERM or SIGINT."""

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    status = None
    with contextlib.suppress(KeyboardInterrupt):
        status = uvloop.run(runner())
    if status:
        sys.exit(status)
