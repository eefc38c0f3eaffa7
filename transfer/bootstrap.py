"""Bootstrap rooms: how decode finds the KV cache prefill made for it.

Prefill runs a `BootstrapServer` on ``host:port`` and announces that address in its discovery
metadata. Decode picks a room, `join`s it over a persistent connection (TCP, or the endpoint's
UNIX socket when prefill is on decode's host: `protocol.local`) and sends prefill
the request naming the room, both at once; the join waits at the server until prefill opens the
room (a prefill that announces nothing answers decode's call with ``{bootstrap_host,
bootstrap_port, bootstrap_room}`` instead). Prefill answers the join with `RoomReady` (where the
KV cache lies) or `RoomFailed` the moment it fails, so decode never waits for a timeout to learn
of a failure. Decode reports `RoomDone` once it holds the cache, and prefill frees its copy; a
decode that leaves a room it joined early (prefill refused the request) says `RoomDone` too, and
the server forgets the room."""

import asyncio
import functools
import logging
import secrets
from dataclasses import dataclass, field

from triptych.protocol import (
    ErrorCode,
    RoomDone,
    RoomFailed,
    RoomJoin,
    RoomMessage,
    RoomReady,
    ServiceError,
)
from triptych.protocol.local import connect, listen_local
from triptych.transfer.framing import FrameProtocol, close_all

log = logging.getLogger(__name__)

Outcome = RoomReady | RoomFailed


def new_room() -> int:
    """A random 63-bit room id (the caller allocates rooms, as with SGLang)."""
    return secrets.randbits(63)


LINGER_S = 30.0
"""How long a closed room's outcome waits for a decode that has not joined yet."""


@dataclass(eq=False)
class _Room:
    outcome: "asyncio.Future[Outcome]" = field(default_factory=asyncio.Future)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: bool = False
    opened: bool = False
    """Prefill opened it (a decode may join a room before prefill has its request)."""


class PrefillRoom:
    """Prefill's side of one room: publish the outcome, wait for decode, then close."""

    def __init__(self, server: "BootstrapServer", room: int) -> None:
        self._server = server
        self.room = room

    def ready(self, message: RoomReady) -> None:
        """The KV cache is ready: tell decode where it is."""
        self._server._settle(self.room, message)

    def fail(self, message: str, code: int = ErrorCode.INTERNAL) -> None:
        """Prefill failed: tell decode now."""
        self._server._settle(self.room, RoomFailed(room=self.room, message=message, code=code))

    async def wait_done(self, timeout: float) -> bool:
        """Wait until decode reports it holds the cache; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._server._room(self.room).done.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Forget the room (fails it for a decode that has not joined yet)."""
        if not self._server._settled(self.room):
            self.fail("prefill released the room", ErrorCode.UNAVAILABLE)
        self._server._release(self.room)


class BootstrapServer:
    """The prefill side: a TCP endpoint where decode instances join rooms."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
        self._bind = (host, port)
        self.host = advertise_host or host
        """The host decode instances are told to join at: routable, never a wildcard."""
        if self.host.strip() in {"", "0.0.0.0", "::", "[::]"}:
            raise ValueError(
                f"the bootstrap endpoint binds {host!r}: it needs an address to advertise"
            )
        self.port = port
        self._rooms: dict[int, _Room] = {}
        self._server: asyncio.Server | None = None
        self._local: asyncio.Server | None = None
        self._connections: set[_Decode] = set()

    async def start(self) -> None:
        """Listen (by TCP, and for decode instances on this host by the UNIX socket named after
        the advertised address: `protocol.local`). Safe to call twice."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Decode(self), *self._bind)
            self.port = self._server.sockets[0].getsockname()[1]
            self._local = await listen_local(
                loop, lambda: _Decode(self), "bootstrap", self.host, self.port
            )

    async def close(self) -> None:
        """Stop listening and drop every connection. Safe to call twice."""
        for server in (self._server, self._local):
            if server is not None:
                server.close()
        self._server = self._local = None
        await close_all(self._connections)

    def open(self, room: int) -> PrefillRoom:
        """Open a room for one request."""
        self._room(room).opened = True
        return PrefillRoom(self, room)

    @property
    def open_rooms(self) -> int:
        """Rooms not yet closed."""
        return len(self._rooms)

    def _room(self, room: int) -> _Room:
        entry = self._rooms.get(room)
        if entry is None:  # a new room's future and event only when it is new
            entry = self._rooms[room] = _Room()
        return entry

    def _release(self, room: int) -> None:
        entry = self._rooms.get(room)
        if entry is None or entry.delivered:
            self._rooms.pop(room, None)
        else:  # keep the outcome for a decode that joins late, then forget it
            asyncio.get_running_loop().call_later(LINGER_S, self._rooms.pop, room, None)

    def _settled(self, room: int) -> bool:
        entry = self._rooms.get(room)
        return entry is None or entry.outcome.done()

    def _settle(self, room: int, outcome: Outcome) -> None:
        entry = self._rooms.get(room)
        if entry is not None and not entry.outcome.done():
            entry.outcome.set_result(outcome)

    def _received(self, connection: "_Decode", message: RoomMessage) -> None:
        if isinstance(message, RoomJoin):  # answered once the room's outcome is known
            entry = self._room(message.room)
            entry.outcome.add_done_callback(functools.partial(_answer, entry, connection))
        elif isinstance(message, RoomDone) and message.room in self._rooms:
            entry = self._rooms[message.room]
            entry.done.set()
            if not entry.opened:  # decode gave up before prefill had the request
                self._settle(message.room, RoomFailed(room=message.room, message="left"))
                del self._rooms[message.room]


class _Decode(FrameProtocol):
    """Prefill's end of one decode instance's connection."""

    def __init__(self, server: BootstrapServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._connections.add(self)

    def received(self, message: RoomMessage) -> None:
        self._server._received(self, message)

    def refused(self, error: ValueError) -> None:
        log.warning("bad bootstrap frame: %s", error)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server._connections.discard(self)


def _answer(entry: _Room, connection: _Decode, outcome: "asyncio.Future[Outcome]") -> None:
    """Tell the decode that joined a room its outcome, unless its connection closed since (one
    small frame: queued without waiting for the buffer to drain)."""
    if connection.closed or outcome.cancelled():
        return
    entry.delivered = True
    connection.send(outcome.result())


_LOST = "prefill bootstrap connection lost"
_EOF = "IncompleteReadError"
"""What a connection that prefill closed is reported as (the stream reader's exception: the
error text is the same as it was)."""


class _Prefill(FrameProtocol):
    """Decode's end of its connection to one prefill bootstrap endpoint: the joins waiting for
    their room's outcome fail with UNAVAILABLE when it is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future[Outcome]] = {}

    @property
    def alive(self) -> bool:
        return not self.closed

    def received(self, message: RoomMessage) -> None:
        if isinstance(message, RoomReady | RoomFailed):
            future = self.pending.pop(message.room, None)
            if future is not None and not future.done():
                future.set_result(message)

    def refused(self, error: ValueError) -> None:
        self.fail(f"{_LOST}: {type(error).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.fail(f"{_LOST}: {_EOF if exc is None else type(exc).__name__}")

    def fail(self, error: str) -> None:
        """Fail every join still waiting (once: the first reason is kept)."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ServiceError(ErrorCode.UNAVAILABLE, error))
        self.pending.clear()


class BootstrapClient:
    """The decode side: one persistent connection per prefill bootstrap endpoint (by its UNIX
    socket when prefill is on this host)."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int], _Prefill] = {}
        self._lock = asyncio.Lock()

    async def join(self, host: str, port: int, room: int) -> RoomReady:
        """Wait for the room's KV cache; raises `ServiceError` as soon as prefill fails."""
        connection = await self._connect(host, port)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        connection.pending[room] = future
        connection.send(RoomJoin(room=room))
        try:
            await connection.drain()
            outcome = await future
        except asyncio.CancelledError:
            if connection.alive:  # leave the room: prefill frees it (or forgets an early join)
                connection.send(RoomDone(room=room))
            raise
        finally:
            connection.pending.pop(room, None)
        if isinstance(outcome, RoomFailed):
            raise ServiceError(outcome.code, f"prefill failed: {outcome.message}")
        return outcome

    async def done(self, host: str, port: int, room: int) -> None:
        """Tell prefill the cache was received."""
        connection = await self._connect(host, port)
        connection.send(RoomDone(room=room))
        await connection.drain()

    async def close(self) -> None:
        """Close every connection (the joins still waiting fail). Safe to call twice."""
        for connection in self._connections.values():
            connection.fail(_LOST)
        await close_all(self._connections.values())
        self._connections.clear()

    async def _connect(self, host: str, port: int) -> _Prefill:
        key = (host, port)
        connection = self._connections.get(key)
        if connection is not None and connection.alive:
            return connection
        async with self._lock:
            connection = self._connections.get(key)
            if connection is None or not connection.alive:
                loop = asyncio.get_running_loop()
                try:
                    _, connection = await connect(loop, _Prefill, "bootstrap", host, port)
                except OSError as error:
                    raise ServiceError(
                        ErrorCode.UNAVAILABLE, f"cannot reach prefill bootstrap {host}:{port}"
                    ) from error
                self._connections[key] = connection
            return connection
