"""Peers on one host meet on UNIX sockets (`protocol.local`); everyone else on TCP."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from triptych.protocol import RoomReady, local
from triptych.runtime.links import (
    CALLS_METADATA,
    KEY_METADATA,
    CallerLink,
    LinkCall,
    LinkDialer,
    LinkServer,
)
from triptych.transfer import BootstrapClient, BootstrapServer


def family(connection: asyncio.BaseProtocol) -> socket.AddressFamily:
    """The address family of the socket under one end of a connection."""
    transport = connection._transport  # type: ignore[attr-defined]
    return transport.get_extra_info("socket").family  # type: ignore[no-any-return]


async def room_round_trip(server: BootstrapServer, client: BootstrapClient, room: int) -> None:
    opened = server.open(room)
    joined = asyncio.create_task(client.join(server.host, server.port, room))
    opened.ready(RoomReady(room=room))
    assert (await asyncio.wait_for(joined, 5)).room == room
    await client.done(server.host, server.port, room)
    assert await opened.wait_done(5)
    opened.close()


@pytest.fixture
async def links() -> AsyncIterator[tuple[LinkServer, LinkDialer]]:
    server = LinkServer()

    async def accept(call: LinkCall) -> None:
        await call.respond()

    server.serve("svc.generate", accept)
    dialer = LinkDialer("caller", lambda *_: None, lambda _link: None)
    yield server, dialer
    await dialer.close()
    await server.close()


async def linked(dialer: LinkDialer, server: LinkServer, host: str) -> CallerLink:
    """The dialer's link to `server`, once up, after one call on it was accepted."""
    metadata = {"host": host, "stream_port": str(server.port), CALLS_METADATA: "1"}
    metadata[KEY_METADATA] = server.key
    dialer.ensure(metadata)
    for _ in range(100):
        link = dialer.for_calls(metadata)
        if link is not None:
            ack = await link.call(
                "svc.generate", "r1", "caller.1", time.time() + 5, b"{}", timeout=5.0
            )
            assert ack.headers is None
            return link
        await asyncio.sleep(0.02)
    raise AssertionError("no link")


LINUX_ONLY = pytest.mark.skipif(not local.AVAILABLE, reason="abstract UNIX sockets are Linux's")


@pytest.mark.parametrize(
    ("abstract_sockets", "expected"),
    [pytest.param(True, socket.AF_UNIX, marks=LINUX_ONLY), (False, socket.AF_INET)],
)
async def test_a_decode_joins_rooms_on_prefills_unix_socket_where_there_is_one(
    monkeypatch: pytest.MonkeyPatch, abstract_sockets: bool, expected: socket.AddressFamily
) -> None:
    monkeypatch.setattr(local, "AVAILABLE", abstract_sockets)
    server, client = BootstrapServer(), BootstrapClient()
    await server.start()
    try:
        await room_round_trip(server, client, 11)
        (connection,) = client._connections.values()
        assert family(connection) == expected
        (served,) = server._connections
        assert family(served) == expected
    finally:
        await client.close()
        await server.close()


@LINUX_ONLY
async def test_a_caller_on_the_workers_host_links_over_a_unix_socket(
    links: tuple[LinkServer, LinkDialer],
) -> None:
    server, dialer = links
    await server.start("127.0.0.1", advertised="127.0.0.1")
    assert family(await linked(dialer, server, "127.0.0.1")) == socket.AF_UNIX


async def test_a_worker_that_advertises_no_host_is_linked_by_tcp(
    links: tuple[LinkServer, LinkDialer],
) -> None:
    server, dialer = links
    await server.start("127.0.0.1")  # no advertised address: no UNIX socket to name
    assert family(await linked(dialer, server, "127.0.0.1")) == socket.AF_INET
