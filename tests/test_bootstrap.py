"""Bootstrap rooms: decode gets the KV hand-off, or prefill's failure at once."""

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from triptych.protocol import ErrorCode, RoomReady, ServiceError
from triptych.transfer import BootstrapClient, BootstrapServer
from triptych.transfer.framing import FrameProtocol

Pair = tuple[BootstrapServer, BootstrapClient]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A listening bootstrap server (prefill's side) and a client (decode's), closed after."""
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    yield server, client


async def waiting_join(pair: Pair, room: int) -> "asyncio.Task[RoomReady]":
    """Decode joins `room` and is left waiting there."""
    server, client = pair
    joined = asyncio.create_task(client.join(server.host, server.port, room))
    await asyncio.sleep(0.05)
    return joined


async def test_decode_receives_what_prefill_offers(pair: Pair) -> None:
    server, client = pair
    slot = server.open(42)
    joined = await waiting_join(pair, 42)
    assert not joined.done()
    slot.ready(RoomReady(room=42, rope_delta=-3))
    assert (await joined).rope_delta == -3
    await client.done(server.host, server.port, 42)
    assert await slot.wait_done(2)
    slot.close()
    assert server.open_rooms == 0


async def test_prefill_failure_reaches_decode_at_once(pair: Pair) -> None:
    server = pair[0]
    slot = server.open(7)
    joined = await waiting_join(pair, 7)
    begun = time.monotonic()
    slot.fail("embeddings could not be read")
    with pytest.raises(ServiceError, match="embeddings could not be read"):
        await joined
    assert time.monotonic() - begun < 0.5


async def test_a_failure_waits_for_a_decode_that_joins_late(pair: Pair) -> None:
    server, client = pair
    slot = server.open(8)
    slot.fail("boom")
    slot.close()
    with pytest.raises(ServiceError, match="boom"):
        await asyncio.wait_for(client.join(server.host, server.port, 8), 2)


async def test_lost_prefill_fails_waiting_decodes(pair: Pair) -> None:
    server = pair[0]
    server.open(1)
    joined = await waiting_join(pair, 1)
    await server.close()
    with pytest.raises(ServiceError, match="connection lost"):
        await asyncio.wait_for(joined, 2)


def count_writes(connection: FrameProtocol, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What each socket write of `connection` carried, from now on."""
    transport = connection._transport
    assert transport is not None
    writes: list[bytes] = []
    write = transport.write

    def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        write(data)

    monkeypatch.setattr(transport, "write", counted)
    return writes


async def test_frames_of_one_turn_leave_in_one_write(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joins sent in one event-loop turn reach prefill in one write, and the outcomes prefill
    publishes in one turn reach decode in one write."""
    server, client = pair
    await client.done(server.host, server.port, 999)  # connected (a room nobody knows)
    await asyncio.sleep(0.05)
    joins = count_writes(client._connections[server.host, server.port], monkeypatch)
    (prefill_end,) = server._connections
    answers = count_writes(prefill_end, monkeypatch)
    rooms = range(100, 105)
    slots = [server.open(room) for room in rooms]
    joined = [asyncio.create_task(client.join(server.host, server.port, room)) for room in rooms]
    await asyncio.sleep(0.05)
    assert len(joins) == 1 and joins[0].count(b'"join"') == len(rooms)
    for room, slot in zip(rooms, slots, strict=True):
        slot.ready(RoomReady(room=room))
    assert [ready.room for ready in await asyncio.gather(*joined)] == list(rooms)
    assert len(answers) == 1 and answers[0].count(b'"ready"') == len(rooms)


async def fake_prefill(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.Server:
    """A bootstrap endpoint that answers each connection with `answer`."""
    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Prefill's connection closes under a waiting join (no server close, no answer)."""
    await reader.read(1)
    writer.close()


async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Prefill answers a join with a frame that is not a message."""
    await reader.read(1)
    writer.write(struct.pack("!I", 5) + b"nope!")
    await reader.read()  # until decode closes


@pytest.mark.parametrize(
    ("answer", "lost"),
    [(hang_up, "connection lost"), (garble, "connection lost: ValidationError")],
)
async def test_a_broken_connection_fails_waiting_joins_as_unavailable(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], lost: str
) -> None:
    prefill, client = await fake_prefill(answer), BootstrapClient()
    port = prefill.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServiceError, match=lost) as failed:
            await asyncio.wait_for(client.join("127.0.0.1", port, 3), 2)
        assert failed.value.code == ErrorCode.UNAVAILABLE
    finally:
        await client.close()
        prefill.close()


async def test_closing_the_client_fails_waiting_joins(pair: Pair) -> None:
    server, client = pair
    server.open(5)
    joined = await waiting_join(pair, 5)
    await client.close()
    with pytest.raises(ServiceError, match="connection lost") as lost:
        await joined
    assert lost.value.code == ErrorCode.UNAVAILABLE


async def test_unreachable_prefill_is_unavailable() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(ServiceError, match="cannot reach prefill bootstrap") as refused:
        await BootstrapClient().join("127.0.0.1", port, 6)
    assert refused.value.code == ErrorCode.UNAVAILABLE


async def test_a_cancelled_early_join_leaves_the_room(pair: Pair) -> None:
    """Decode joins before prefill has the request, then gives up: prefill forgets the room."""
    server = pair[0]
    joined = await waiting_join(pair, 9)
    assert server.open_rooms == 1
    joined.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joined
    await asyncio.sleep(0.05)
    assert server.open_rooms == 0


async def test_a_bad_frame_closes_only_its_connection(pair: Pair) -> None:
    server, client = pair
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(struct.pack("!I", 2**30))  # over the frame limit
    assert await asyncio.wait_for(reader.read(), 2) == b""  # prefill hung up
    writer.close()
    slot = server.open(11)
    slot.ready(RoomReady(room=11))
    assert (await asyncio.wait_for(client.join(server.host, server.port, 11), 2)).room == 11
