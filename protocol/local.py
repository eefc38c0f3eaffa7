"""Where a triptych endpoint also listens for peers on its own host.

Each TCP endpoint a worker announces (its direct links, prefill's bootstrap rooms) also listens
on a Linux abstract UNIX socket named after the address it announces. An abstract name lives
in a network namespace, so only peers that share the endpoint's host (or pod) can reach it:
they connect there and skip the TCP/IP stack, which costs a small loopback message several
times what a UNIX socket does. Every other peer, and every system without abstract sockets,
connects by TCP. The endpoint's own checks (a link's key) apply whichever way a peer comes in.
"""

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

AVAILABLE = sys.platform.startswith("linux")
"""Whether this system has abstract UNIX sockets."""

P = TypeVar("P", bound=asyncio.Protocol)


def local_name(host: str, port: int) -> str:
    """The abstract UNIX socket name of the endpoint announced as `host`:`port`."""
    return f"\0triptych:{host}:{port}"


async def listen_local(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
) -> asyncio.Server | None:
    """Serve the endpoint announced as `host`:`port` on its same-host UNIX socket too (None
    where there is none: not Linux, or the name is taken)."""
    if not AVAILABLE:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(local_name(host, port))
    except OSError:
        sock.close()
        return None
    return await loop.create_unix_server(factory, sock=sock, backlog=1024)


async def connect(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], P], host: str, port: int
) -> tuple[asyncio.BaseTransport, P]:
    """Connect to the endpoint announced as `host`:`port`: by its UNIX socket when it is on
    this host, else by TCP."""
    if AVAILABLE:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(local_name(host, port))
        except OSError:  # elsewhere (or its backlog is full): TCP
            sock.close()
        else:
            return await loop.create_unix_connection(factory, sock=sock)
    return await loop.create_connection(factory, host, port)
