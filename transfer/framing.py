"""Length-prefixed frames of protocol messages over an asyncio TCP stream."""

import asyncio
import socket
import struct

from pydantic import BaseModel, TypeAdapter

from triptych.protocol import RoomMessage

_HEADER = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024
_ROOM_MESSAGES: TypeAdapter[RoomMessage] = TypeAdapter(RoomMessage)


def no_delay(writer: asyncio.StreamWriter) -> None:
    """Send small frames at once (no Nagle + delayed-ACK stalls)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def write_frame(writer: asyncio.StreamWriter, message: BaseModel) -> None:
    """Queue one message on `writer` (the caller drains)."""
    body = message.__pydantic_serializer__.to_json(message)
    writer.write(_HEADER.pack(len(body)) + body)


async def read_frame(reader: asyncio.StreamReader) -> RoomMessage:
    """Read one message; raises `asyncio.IncompleteReadError` when the peer closes."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"bootstrap frame of {size} bytes is over the limit")
    return _ROOM_MESSAGES.validate_json(await reader.readexactly(size))
