"""Where a triptych endpoint also listens for peers on its own host.

Each TCP endpoint a worker announces (its direct links, prefill's bootstrap rooms) also listens
on a Linux abstract UNIX socket named after its kind and the address it announces
(``@triptych-link:10.0.0.5:41234`` in ``ss -xl``). An abstract name lives in a network
namespace, so only peers that share the endpoint's host (or pod) can reach it: they connect
there and skip the TCP/IP stack, which costs a small loopback message several times what a
UNIX socket does. Every other peer, and every system without abstract sockets, connects by TCP.
The endpoint's own checks (a link's key) apply whichever way a peer comes in.
"""

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import Literal, TypeVar

AVAILABLE = sys.platform.startswith("linux")
"""Whether this system has abstract UNIX sockets."""

P = TypeVar("P", bound=asyncio.Protocol)
Kind = Literal["link", "bootstrap"]
"""The endpoints that listen on a same-host socket: direct links, prefill's bootstrap rooms."""
log = logging.getLogger(__name__)


def local_name(kind: Kind, host: str, port: int) -> str:
    """The abstract UNIX socket name of the `kind` endpoint announced as `host`:`port`."""
    return f"\0triptych-{kind}:{host}:{port}"


async def listen_local(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    kind: Kind,
    host: str,
    port: int,
) -> asyncio.Server | None:
    """Serve the `kind` endpoint announced as `host`:`port` on its same-host UNIX socket too
    (None where there is none: not Linux, or the name is taken)."""
    if not AVAILABLE:
        return None
    name = local_name(kind, host, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        return await loop.create_unix_server(factory, sock=sock, backlog=1024)
    except OSError as error:
        sock.close()
        # Only an endpoint announcing the same address could hold the name; TCP callers
        # would reach that one as well.
        log.warning("no same-host socket for the %s endpoint %s:%d: %s", kind, host, port, error)
        return None


async def connect(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], P], kind: Kind, host: str, port: int
) -> tuple[asyncio.BaseTransport, P]:
    """Connect to the `kind` endpoint announced as `host`:`port`: by its UNIX socket when it
    is on this host, else by TCP."""
    if AVAILABLE:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(local_name(kind, host, port))
        except OSError:  # elsewhere (or its backlog is full): TCP
            sock.close()
        else:
            return await loop.create_unix_connection(factory, sock=sock)
    return await loop.create_connection(factory, host, port)
