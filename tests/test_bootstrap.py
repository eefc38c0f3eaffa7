"""Bootstrap rooms: decode gets the KV hand-off, or prefill's failure at once."""

import asyncio
import time

import pytest

from triptych.protocol import RoomReady, ServiceError
from triptych.transfer import BootstrapClient, BootstrapServer


async def test_decode_receives_what_prefill_offers() -> None:
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    slot = server.open(42)
    joined = asyncio.create_task(client.join(server.host, server.port, 42))
    await asyncio.sleep(0.05)
    assert not joined.done()
    slot.ready(RoomReady(room=42, rope_delta=-3))
    assert (await joined).rope_delta == -3
    await client.done(server.host, server.port, 42)
    assert await slot.wait_done(2)
    slot.close()
    assert server.open_rooms == 0
    await client.close()
    await server.close()


async def test_prefill_failure_reaches_decode_at_once() -> None:
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    slot = server.open(7)
    joined = asyncio.create_task(client.join(server.host, server.port, 7))
    await asyncio.sleep(0.05)
    begun = time.monotonic()
    slot.fail("embeddings could not be read")
    with pytest.raises(ServiceError, match="embeddings could not be read"):
        await joined
    assert time.monotonic() - begun < 0.5
    await client.close()
    await server.close()


async def test_a_failure_waits_for_a_decode_that_joins_late() -> None:
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    slot = server.open(8)
    slot.fail("boom")
    slot.close()
    with pytest.raises(ServiceError, match="boom"):
        await asyncio.wait_for(client.join(server.host, server.port, 8), 2)
    await client.close()
    await server.close()


async def test_lost_prefill_fails_waiting_decodes() -> None:
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    server.open(1)
    joined = asyncio.create_task(client.join(server.host, server.port, 1))
    await asyncio.sleep(0.05)
    await server.close()
    with pytest.raises(ServiceError, match="connection lost"):
        await asyncio.wait_for(joined, 2)
    await client.close()
