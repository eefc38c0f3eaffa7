"""Direct links: calls and their response streams on a TCP link between caller and worker.

NATS stays the control plane (discovery, cancels, and calls to a worker that offers no link).
Calls and response frames take a shorter way when they can: a caller opens one TCP link to each
instance that announces ``stream_port`` in its NATS metadata (at the instance's advertised
``host``, so it works across hosts and pods; a caller on the instance's own host connects to its
UNIX socket instead, `protocol.local`) and names the stream subjects it owns (its stream
prefix). It then sends its calls on that link when the instance also announces ``link_calls``
(acknowledged on the link), and the instance writes every frame for those subjects to the link
instead of publishing it through nats-server. Frames written in one event-loop turn leave in
one write, whichever calls or streams they belong to.

A stream picks its path when the worker takes it and keeps it, so its frames stay in order.
When a link drops, the caller fails at once every stream that link carried and every call it
still waits on (the worker, or the network, is gone); a stream that has not sent a frame yet
falls back to the idle timeout, as on NATS.

Only a caller that read the instance's discovery metadata may use a link: the instance
announces a random ``link_key`` there (as reachable as NATS's own credentials allow), and
closes a link whose hello does not carry it.

Wire: the caller sends ``!HH`` lengths + its stream prefix + the key once; then both sides
send frames of ``!IBQ`` (payload length, kind, number) + payload. The caller sends CALL frames
(number: the call's; payload ``!dHHH`` deadline and the lengths of subject, request id and
stream subject, those three, then the request); the worker answers each with an ACK frame
(``!HH`` error code, 0 when accepted, and message length, the message, then error data) and
sends stream frames (number: the stream subject's last token).
"""

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from triptych.protocol.local import connect, listen_local
from triptych.runtime import wire
from triptych.runtime.tasks import TaskOwner

log = logging.getLogger(__name__)

DATA, END, ERROR, KEEPALIVE, CALL, ACK = range(6)
_HELLO = struct.Struct("!HH")
_FRAME = struct.Struct("!IBQ")
_CALL = struct.Struct("!dHHH")
_ACK = struct.Struct("!HH")
MAX_FRAME = 16 * 1024 * 1024
REDIAL_S = 1.0
"""How long a caller waits before dialling an instance again after a failed attempt."""
CALLS_METADATA = "link_calls"
"""Metadata key of an instance that takes calls on its links."""
KEY_METADATA = "link_key"
"""Metadata key of the secret a caller shows in its hello."""

Publish = Callable[[str, bytes, dict[str, str] | None], Awaitable[None]]
FrameHandler = Callable[[str, int, bytes, "CallerLink"], None]
"""(prefix.number subject, kind, payload, link) for each stream frame a caller receives."""
CallHandler = Callable[["LinkCall"], Coroutine[Any, Any, None]]
"""Serves one call that arrived on a link (answers it with `respond` or `respond_error`)."""

_HEADERS: tuple[dict[str, str] | None, ...] = (
    None,
    wire.END_HEADERS,
    {wire.ERROR_CODE: "500"},  # the payload (an ErrorInfo) carries the real code
    wire.KEEPALIVE_HEADERS,
)


class LinkLost(ConnectionError):
    """The link a call waited on closed before the call was acknowledged."""


def frame_headers(kind: int) -> dict[str, str] | None:
    """The NATS headers a stream frame of `kind` would have carried."""
    return _HEADERS[kind]


def _kind(headers: dict[str, str] | None) -> int:
    if headers is None:
        return DATA
    if headers is wire.END_HEADERS or wire.END in headers:
        return END
    if headers is wire.KEEPALIVE_HEADERS or wire.KEEPALIVE in headers:
        return KEEPALIVE
    return ERROR


class _Frames(asyncio.Protocol):
    """One end of a link: coalesces outgoing frames per event-loop turn, splits incoming ones."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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

    def _frames(self, data: bytes, kinds: range) -> list[tuple[int, int, bytes]]:
        """The whole frames `data` completes, as (kind, number, payload); a frame of a kind
        outside `kinds`, or too large, closes the link."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, int, bytes]] = []
        offset, size, head = 0, len(buffer), _FRAME.size
        while size - offset >= head:
            length, kind, number = _FRAME.unpack_from(buffer, offset)
            if length > MAX_FRAME or kind not in kinds:
                log.warning("bad frame on a direct link; closing it")
                self.close()
                return []
            end = offset + head + length
            if end > size:
                break
            frames.append((kind, number, bytes(buffer[offset + head : end])))
            offset = end
        del buffer[:offset]
        return frames

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


@dataclass(eq=False)
class LinkCall:
    """A call that arrived on a link, answered like a NATS request (`headers`, `data`,
    `respond`, `respond_error`)."""

    link: "_WorkerLink"
    number: int
    subject: str
    headers: dict[str, str]
    data: bytes

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Accept the call."""
        self.link.send(self.number, ACK, _ACK.pack(0, 0))

    async def respond_error(
        self,
        code: str,
        description: str,
        data: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Refuse the call with `code` (and an `ErrorInfo` in `data` where there is one)."""
        message = description.encode()
        self.link.send(self.number, ACK, _ACK.pack(int(code), len(message)) + message + data)


class _WorkerLink(_Frames):
    """The worker's end of one caller's link."""

    def __init__(self, server: "LinkServer") -> None:
        super().__init__()
        self._server = server
        self.prefix = ""
        self._writable = asyncio.Event()
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if not self.prefix:
            buffer = self._buffer
            buffer += data
            if len(buffer) < _HELLO.size:
                return
            prefix_size, key_size = _HELLO.unpack_from(buffer)
            end = _HELLO.size + prefix_size + key_size
            if len(buffer) < end:
                return
            key = bytes(buffer[_HELLO.size + prefix_size : end])
            if not hmac.compare_digest(key, self._server.key.encode()):
                log.warning("a direct link without this instance's key; closing it")
                self.close()
                return
            self.prefix = buffer[_HELLO.size : _HELLO.size + prefix_size].decode()
            data = bytes(buffer[end:])
            self._buffer = bytearray()
            self._server._register(self)
        for _, number, payload in self._frames(data, range(CALL, CALL + 1)):
            self._server._call(self, number, payload)

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


class LinkServer:
    """A worker's TCP endpoint for direct links: serves the calls that arrive on them, and
    `publisher` routes a stream to its caller's link."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._local: asyncio.Server | None = None
        self._links: dict[str, _WorkerLink] = {}
        self._all: set[_WorkerLink] = set()
        self._handlers: dict[str, CallHandler] = {}
        self._tasks = TaskOwner("link-calls")
        self.port = 0
        self.key = secrets.token_hex(16)
        """What a caller must show in its hello (announced as ``link_key``)."""

    async def start(self, host: str, port: int = 0, advertised: str | None = None) -> int:
        """Listen on `host`, and for callers on this host on the UNIX socket named after the
        `advertised` address (`protocol.local`); returns the bound port. Safe to call twice."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _WorkerLink(self), host, port)
            self.port = int(self._server.sockets[0].getsockname()[1])
            if advertised:
                self._local = await listen_local(
                    loop, lambda: _WorkerLink(self), "link", advertised, self.port
                )
        return self.port

    def serve(self, subject: str, handler: CallHandler) -> None:
        """Serve the calls for `subject` (an endpoint subject of this process) with `handler`."""
        self._handlers[subject] = handler

    def stop_serving(self, subject: str) -> None:
        """Calls for `subject` are refused from now on, as NATS would say "no responders"."""
        self._handlers.pop(subject, None)

    async def close(self) -> None:
        """Stop listening and close every link. Safe to call twice."""
        self._handlers.clear()
        for server in (self._server, self._local):
            if server is not None:
                server.close()
        self._server = self._local = None
        await self._tasks.close()
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

    def _call(self, link: _WorkerLink, number: int, payload: bytes) -> None:
        deadline, subject_size, id_size, stream_size = _CALL.unpack_from(payload)
        at = _CALL.size
        subject = payload[at : at + subject_size].decode()
        at += subject_size
        request_id = payload[at : at + id_size].decode()
        at += id_size
        stream_to = payload[at : at + stream_size].decode()
        headers = {
            wire.REQUEST_ID: request_id,
            wire.STREAM_TO: stream_to,
            wire.DEADLINE: repr(deadline),
        }
        call = LinkCall(link, number, subject, headers, payload[at + stream_size :])
        handler = self._handlers.get(subject)
        if handler is None:
            self._tasks.spawn(call.respond_error("503", "no responders"), name=request_id)
        else:
            self._tasks.spawn(handler(call), name=request_id)

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


@dataclass(frozen=True)
class LinkAck:
    """A worker's answer to a call on a link, shaped like a NATS reply (`headers`, `data`)."""

    headers: dict[str, str] | None
    data: bytes


class CallerLink(_Frames):
    """The caller's end of one link: sends calls, hands stream frames to the runtime."""

    def __init__(
        self,
        prefix: str,
        key: str,
        on_frame: FrameHandler,
        on_lost: Callable[["CallerLink"], None],
    ):
        super().__init__()
        self._prefix = prefix
        self._key = key
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._call_numbers = itertools.count()
        self._calls: dict[int, asyncio.Future[LinkAck]] = {}
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        prefix, key = self._prefix.encode(), self._key.encode()
        cast(asyncio.Transport, transport).write(_HELLO.pack(len(prefix), len(key)) + prefix + key)

    async def call(
        self,
        subject: str,
        request_id: str,
        stream_to: str,
        deadline: float,
        data: bytes,
        *,
        timeout: float,
    ) -> LinkAck:
        """Send one call and wait up to `timeout` seconds for its acknowledgement; raises
        `TimeoutError` after that, `LinkLost` when the link closes first. (One timer on the
        answer: cheaper than a timeout scope around the wait, on every call.)"""
        if self.lost.is_set():
            raise LinkLost("the link is closed")
        number = next(self._call_numbers)
        names = subject.encode(), request_id.encode(), stream_to.encode()
        head = _CALL.pack(deadline, *(len(name) for name in names))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[LinkAck] = loop.create_future()
        self._calls[number] = answer
        expiry = loop.call_later(timeout, _expire, answer)
        self.send(number, CALL, b"".join((head, *names, data)))
        try:
            return await answer
        finally:
            expiry.cancel()
            self._calls.pop(number, None)

    def data_received(self, data: bytes) -> None:
        prefix = self._prefix
        for kind, number, payload in self._frames(data, range(ACK + 1)):
            if kind != ACK:
                self._on_frame(f"{prefix}.{number}", kind, payload, self)
                continue
            answer = self._calls.get(number)
            if answer is not None and not answer.done():
                answer.set_result(_ack(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost.set()
        for answer in self._calls.values():
            if not answer.done():
                answer.set_exception(LinkLost("the link closed before the call was accepted"))
        self._on_lost(self)


def _expire(answer: "asyncio.Future[LinkAck]") -> None:
    if not answer.done():
        answer.set_exception(TimeoutError("no acknowledgement in time"))


def _ack(payload: bytes) -> LinkAck:
    code, size = _ACK.unpack_from(payload)
    if code == 0:
        return LinkAck(None, b"")
    message = payload[_ACK.size : _ACK.size + size].decode(errors="replace")
    headers = {wire.ERROR_CODE: str(code), wire.ERROR: message}
    return LinkAck(headers, payload[_ACK.size + size :])


class LinkDialer:
    """A caller's links, one per (host, port) of an instance that offers direct links."""

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
        key = _address(metadata)
        if key is None:
            return
        link = self._links.get(key)
        if link is not None and not link.lost.is_set():
            return
        if key in self._dialling or time.monotonic() - self._failed.get(key, -REDIAL_S) < REDIAL_S:
            return
        self._dialling.add(key)
        secret = metadata.get(KEY_METADATA, "")
        self._tasks.spawn(self._dial(key, secret), name=f"link:{key[0]}:{key[1]}")

    def for_calls(self, metadata: dict[str, str]) -> CallerLink | None:
        """The live link to the instance `metadata` describes, when it takes calls on it."""
        key = _address(metadata)
        if key is None or metadata.get(CALLS_METADATA) != "1":
            return None
        link = self._links.get(key)
        return link if link is not None and not link.lost.is_set() else None

    @property
    def linked(self) -> int:
        """Live links."""
        return sum(not link.lost.is_set() for link in self._links.values())

    async def _dial(self, key: tuple[str, int], secret: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, link = await connect(
                loop,
                lambda: CallerLink(self._prefix, secret, self._on_frame, self._lost),
                "link",
                *key,
            )
        except OSError as error:
            self._failed[key] = time.monotonic()
            log.info("no direct link to %s:%d (%s); calls and streams go by NATS", *key, error)
            return
        finally:
            self._dialling.discard(key)
        self._failed.pop(key, None)
        self._links[key] = link
        log.debug("direct link to %s:%d", *key)

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


def _address(metadata: dict[str, str]) -> tuple[str, int] | None:
    port = metadata.get("stream_port", "")
    host = metadata.get("host", "")
    return (host, int(port)) if host and port.isdigit() else None
