"""Length-prefixed frames of protocol messages over an asyncio TCP connection.

A frame is ``!I`` (the body's length) + the message as JSON. `FrameProtocol` is one end of such
a connection, as an `asyncio.Protocol` rather than a stream reader and writer: the frames queued
in one event-loop turn leave in one socket write (a decode worker joins and leaves many rooms per
turn), and the bytes that arrive are split into messages where they arrive, with no reader task
per connection. It is the shape of `runtime.links`' frames, not shared with them: transfer sits
below runtime in the layers contract, and runtime importing this module would load the whole
transfer package (torch with it) into every process that uses the runtime."""

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterable
from typing import cast

from pydantic import BaseModel, TypeAdapter

from triptych.protocol import RoomMessage

_HEADER = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024
CLOSE_WAIT_S = 1.0
"""How long `close_all` waits for closed connections to finish sending."""
_ROOM_MESSAGES: TypeAdapter[RoomMessage] = TypeAdapter(RoomMessage)


def encode(message: BaseModel) -> bytes:
    """One message as a frame."""
    body = message.__pydantic_serializer__.to_json(message)
    return _HEADER.pack(len(body)) + body


class FrameProtocol(asyncio.Protocol):
    """One end of a framed connection: subclasses handle each message (`received`) and a frame
    that is not one (`refused`, after which the connection closes)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[bytes] = []
        self._buffer = bytearray()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        """Closing or gone (we closed it, the peer did, or it failed): nothing more is sent or
        handled. A flag, not the transport's state: it is read for every frame."""
        self.lost = asyncio.Event()
        """Set once the connection is closed and gone (`connection_lost`)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        sock = self._transport.get_extra_info("socket")
        if sock is not None:  # small frames leave at once (no Nagle + delayed-ACK stalls)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, message: BaseModel) -> None:
        """Queue one message (dropped once closed); the frames queued in this event-loop turn
        leave in one write, without waiting for the buffer to drain (see `drain`)."""
        if self.closed:
            return
        if not self._pending:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._pending.append(encode(message))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        transport = self._transport
        if pending and transport is not None and not transport.is_closing():
            transport.write(b"".join(pending))

    async def drain(self) -> None:
        """Wait while the socket's send buffer is over its high-water mark."""
        if not self._writable.is_set():
            await self._writable.wait()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self._buffer
        buffer += data
        messages: list[RoomMessage] = []
        refused: ValueError | None = None
        offset, size, head = 0, len(buffer), _HEADER.size
        while size - offset >= head:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                refused = ValueError(f"bootstrap frame of {length} bytes is over the limit")
                break
            end = offset + head + length
            if end > size:
                break
            try:
                messages.append(_ROOM_MESSAGES.validate_json(buffer[offset + head : end]))
            except ValueError as error:  # pydantic's ValidationError is one
                refused = error
                break
            offset = end
        del buffer[:offset]
        for message in messages:  # the messages before a bad frame count, as they arrived
            if self.closed:
                return
            self.received(message)
        if refused is not None and not self.closed:
            self.refused(refused)
            self.close()

    def received(self, message: RoomMessage) -> None:
        """Handle one message from the peer."""
        raise NotImplementedError

    def refused(self, error: ValueError) -> None:
        """The peer sent a frame that is not a message; the connection closes after this."""

    def close(self) -> None:
        """Send what is queued, then close."""
        if not self.closed:
            self.closed = True
            self._flush()
            if self._transport is not None:
                self._transport.close()

    def eof_received(self) -> None:
        self.closed = True  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pending.clear()
        self._writable.set()  # a `drain` waiting for a gone socket returns
        self.lost.set()


async def close_all(connections: Iterable[FrameProtocol]) -> None:
    """Close `connections`, and wait up to `CLOSE_WAIT_S` until they are gone."""
    connections = list(connections)
    for connection in connections:
        connection.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_WAIT_S):
            for connection in connections:
                await connection.lost.wait()
