"""Bootstrap rooms: decode gets the KV hand-off, or prefill's failure at once."""

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from triptych.protocol import RoomReady, ServiceError
from triptych.transfer import BootstrapClient, BootstrapServer

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
