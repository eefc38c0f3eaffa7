"""The one entry shape of every component: config → runtime + engine + handler → serve → drain.

`serve` runs a component's `main` coroutine on uvloop, turns SIGTERM/SIGINT into a graceful
drain, and exits non-zero if start-up fails.
"""

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

import uvloop

from triptych.observability import logs as observability_logs


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Plain-text (or JSON-lines) logs on stderr, each line tagged with its request id."""
    observability_logs.configure_logging(level, fmt)


def serve(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` until it returns; `stop` is set by SIGTERM or SIGINT."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(runner())
