"""The one entry shape of every component: config → runtime + engine + handler → serve → drain.

`serve` runs a component's `main` coroutine on uvloop, turns SIGTERM/SIGINT into a graceful
drain, and exits non-zero if start-up fails or the control plane is lost for good.
"""

import asyncio
import contextlib
import errno
import gc
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import uvloop

from triptych.observability import logs as observability_logs
from triptych.runtime.runtime import Runtime

EXIT_NATS_LOST = 3
"""Exit status of a process that could not reach NATS within its reconnect window."""


class StartupError(Exception):
    """A reason the process cannot start, told in one line (no traceback)."""


def port_in_use(host: str, port: int, flag: str) -> StartupError:
    """The one-line refusal for a port another process holds."""
    return StartupError(
        f"port {port} on {host} is already in use: stop what holds it, or pick another with "
        f"{flag} (0: any free port)"
    )


def is_port_in_use(error: OSError) -> bool:
    """Whether `error` is a bind that failed because the address is taken."""
    return error.errno == errno.EADDRINUSE or "address already in use" in str(error).lower()


def port_taken(host: str, port: int) -> bool:
    """Whether another socket is bound to `host`:`port`: a probe binds it alone (no
    SO_REUSEPORT, so a group of sockets sharing the port refuses it too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if is_port_in_use(error):
                return True
            raise
    return False


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Plain-text (or JSON-lines) logs on stderr, each line tagged with its request id."""
    observability_logs.configure_logging(level, fmt)


def settle_heap() -> None:
    """Call once start-up is done, before the process announces itself: what it loaded
    (modules, the tokenizer, the model's objects) lives as long as it does, so it is frozen
    out of the garbage collector's scans, which would otherwise walk all of it again and again
    while requests run. What start-up left as garbage is collected first, not frozen; that
    full collection pauses the process, which is why it comes before anyone may call it."""
    gc.collect()
    gc.freeze()


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


def serve(main: Callable[[asyncio.Event], Awaitable[int | None]], name: str = "") -> None:
    """Run `main(stop)` until it returns, then exit with the status it returns; `stop` is set
    by SIGTERM or SIGINT. A `StartupError` (or a port already in use) ends the process with
    one line on stderr and status 1."""

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    who = f"triptych {name}" if name else "triptych"
    status = None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            status = uvloop.run(runner())
    except StartupError as error:
        sys.exit(f"{who}: {error}")
    except OSError as error:
        if not is_port_in_use(error):
            raise
        sys.exit(f"{who}: cannot listen: {error.strerror or error}")
    if status:
        sys.exit(status)
