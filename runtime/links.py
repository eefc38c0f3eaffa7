"""Direct streams: a response stream's frames on a TCP link from the worker to its caller.

NATS stays the control plane (calls and their acknowledgements, cancels, discovery). The frames
of a response stream, one per token on decode, take a shorter way when they can: a caller opens
one TCP link to each instance that announces ``stream_port`` in its NATS metadata (at the
instance's advertised ``host``, so it works across hosts and pods) and names the stream subjects
it owns (its stream prefix); the instance then writes every frame for those subjects to that
link instead of publishing it through nats-server. Frames written in one event-loop turn leave
in one write, whichever streams they belong to.

A stream picks its path when the worker takes it and keeps it, so its frames stay in order.
When a link drops, the caller fails at once every stream that link carried (the worker, or the
network, is gone); a stream that has not sent a frame yet falls back to the idle timeout, as
on NATS.

Wire: the caller sends ``!H`` length + its stream prefix once; the worker then sends frames of
``!IBQ`` (payload length, kind, stream number: the subject's last token) + payload.
"""

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import cast

from triptych.runtime import wire
from triptych.runtime.tasks import TaskOwner

log = logging.getLogger(__name__)

DATA, END, ERROR, KEEPALIVE = range(4)
_HELLO = struct.Struct("!H")
_FRAME = struct.Struct("!IBQ")
MAX_FRAME = 16 * 1024 * 1024
REDIAL_S = 1.0
"""How long a caller waits before dialling an instance again after a failed attempt."""

Publish = Callable[[str, bytes, dict[str, str] | None], Awaitable[None]]
FrameHandler = Callable[[str, int, bytes, "CallerLink"], None]
"""(prefix.number subject, kind, payload, link) for each frame a caller receives."""

_HEADERS: tuple[dict[str, str] | None, ...] = (
    None,
    wire.END_HEADERS,
    {wire.ERROR_CODE: "500"},  # the payload (an ErrorInfo) carries the real code
    wire.KEEPALIVE_HEADERS,
)


def frame_headers(kind: int) -> dict[str, str] | None:
    """The NATS headers a frame of `kind` would have carried."""
    return _HEADERS[kind]


def _kind(headers: dict[str, str] | None) -> int:
    if headers is None:
        return DATA
    if headers is wire.END_HEADERS or wire.END in headers:
        return END
    if headers is wire.KEEPALIVE_HEADERS or wire.KEEPALIVE in headers:
        return KEEPALIVE
    return ERROR


class _WorkerLink(asyncio.Protocol):
    """The worker's end of one caller's link: coalesces frames per event-loop turn."""

    def __init__(self, server: "LinkServer") -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._inbox = b""
        self.prefix = ""
        self.closed = False
        self._pending: list[bytes] = []
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _no_delay(self._transport)

    def data_received(self, data: bytes) -> None:
        if self.prefix:
            return  # the caller sends nothing after its hello
        self._inbox += data
        if len(self._inbox) < _HELLO.size:
            return
        (size,) = _HELLO.unpack_from(self._inbox)
        if len(self._inbox) < _HELLO.size + size:
            return
        self.prefix = self._inbox[_HELLO.size : _HELLO.size + size].decode()
        self._inbox = b""
        self._server._register(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._server._unregister(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def publisher(self, number: int) -> Publish:
        """Where the frames of stream `number` go (the subject argument is ignored)."""

        async def publish(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            if self.closed:
                return  # the caller is gone, and has failed the stream on its side
            if not self._writable.is_set():
                await self._writable.wait()
            self.send(number, _kind(headers), data)

        return publish

    def send(self, number: int, kind: int, data: bytes) -> None:
        """Queue one frame; frames queued in this event-loop turn leave in one write."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(_FRAME.pack(len(data), kind, number))
        if data:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class LinkServer:
    """A worker's TCP endpoint for direct streams; `publisher` routes a stream to its link."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._links: dict[str, _WorkerLink] = {}
        self._all: set[_WorkerLink] = set()
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on `host`; returns the bound port. Safe to call twice."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _WorkerLink(self), host, port)
            self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every link. Safe to call twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._all):
            link.close()
        self._links.clear()

    def publisher(self, subject: str) -> Publish | None:
        """The link publisher for `subject`, or None when its owner has no link here."""
        prefix, _, number = subject.rpartition(".")
        link = self._links.get(prefix)
        if link is None or link.closed or not number.isdigit():
            return None
        return link.publisher(int(number))

    def _register(self, link: _WorkerLink) -> None:
        self._all.add(link)
        old = self._links.get(link.prefix)
        self._links[link.prefix] = link
        if old is not None and old is not link:
            old.close()

    def _unregister(self, link: _WorkerLink) -> None:
        self._all.discard(link)
        if self._links.get(link.prefix) is link:
            del self._links[link.prefix]


class CallerLink(asyncio.Protocol):
    """The caller's end of one link: parses frames and hands them to the runtime."""

    def __init__(
        self, prefix: str, on_frame: FrameHandler, on_lost: Callable[["CallerLink"], None]
    ):
        self._prefix = prefix
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _no_delay(self._transport)
        hello = self._prefix.encode()
        self._transport.write(_HELLO.pack(len(hello)) + hello)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size, head = 0, len(buffer), _FRAME.size
        prefix = self._prefix
        while size - offset >= head:
            length, kind, number = _FRAME.unpack_from(buffer, offset)
            if length > MAX_FRAME or kind > KEEPALIVE:
                log.warning("bad frame on a direct stream link; closing it")
                self.close()
                return
            end = offset + head + length
            if end > size:
                break
            payload = bytes(buffer[offset + head : end])
            self._on_frame(f"{prefix}.{number}", kind, payload, self)
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self._on_lost(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class LinkDialer:
    """A caller's links, one per (host, port) of an instance that offers direct streams."""

    def __init__(
        self, prefix: str, on_frame: FrameHandler, on_lost: Callable[[CallerLink], None]
    ) -> None:
        self._prefix = prefix
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._links: dict[tuple[str, int], CallerLink] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._dialling: set[tuple[str, int]] = set()
        self._tasks = TaskOwner("links")

    def ensure(self, metadata: dict[str, str]) -> None:
        """Dial the instance `metadata` describes, unless linked (or recently failed)."""
        port = metadata.get("stream_port", "")
        host = metadata.get("host", "")
        if not host or not port.isdigit():
            return
        key = (host, int(port))
        link = self._links.get(key)
        if link is not None and not link.lost.is_set():
            return
        if key in self._dialling or time.monotonic() - self._failed.get(key, -REDIAL_S) < REDIAL_S:
            return
        self._dialling.add(key)
        self._tasks.spawn(self._dial(key), name=f"link:{host}:{port}")

    @property
    def linked(self) -> int:
        """Live links."""
        return sum(not link.lost.is_set() for link in self._links.values())

    async def _dial(self, key: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, link = await loop.create_connection(
                lambda: CallerLink(self._prefix, self._on_frame, self._lost), *key
            )
        except OSError as error:
            self._failed[key] = time.monotonic()
            log.info("no direct stream link to %s:%d (%s); streams go by NATS", *key, error)
            return
        finally:
            self._dialling.discard(key)
        self._failed.pop(key, None)
        self._links[key] = link
        log.debug("direct stream link to %s:%d", *key)

    def _lost(self, link: CallerLink) -> None:
        for key, known in list(self._links.items()):
            if known is link:
                del self._links[key]
        self._on_lost(link)

    async def close(self) -> None:
        """Close every link. Safe to call twice."""
        await self._tasks.close()
        for link in list(self._links.values()):
            link.close()
        for link in list(self._links.values()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await link.lost.wait()
        self._links.clear()


def _no_delay(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
