"""Bootstrap rooms: how decode finds the KV cache prefill made for it.

Prefill runs a `BootstrapServer` on ``host:port`` and announces that address in its discovery
metadata. Decode picks a room, `join`s it over a persistent TCP connection and sends prefill
the request naming the room, both at once; the join waits at the server until prefill opens the
room (a prefill that announces nothing answers decode's call with ``{bootstrap_host,
bootstrap_port, bootstrap_room}`` instead). Prefill answers the join with `RoomReady` (where the
KV cache lies) or `RoomFailed` the moment it fails, so decode never waits for a timeout to learn
of a failure. Decode reports `RoomDone` once it holds the cache, and prefill frees its copy; a
decode that leaves a room it joined early (prefill refused the request) says `RoomDone` too, and
the server forgets the room."""

import asyncio
import contextlib
import functools
import logging
import secrets
from dataclasses import dataclass, field

from triptych.protocol import (
    ErrorCode,
    RoomDone,
    RoomFailed,
    RoomJoin,
    RoomReady,
    ServiceError,
)
from triptych.transfer.framing import no_delay, read_frame, write_frame

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
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen. Safe to call twice."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, *self._bind)
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection. Safe to call twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        no_delay(writer)
        try:
            while True:
                message = await read_frame(reader)
                if isinstance(message, RoomJoin):  # answered once the room's outcome is known
                    entry = self._room(message.room)
                    entry.outcome.add_done_callback(functools.partial(_answer, entry, writer))
                elif isinstance(message, RoomDone) and message.room in self._rooms:
                    entry = self._rooms[message.room]
                    entry.done.set()
                    if not entry.opened:  # decode gave up before prefill had the request
                        self._settle(message.room, RoomFailed(room=message.room, message="left"))
                        del self._rooms[message.room]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # close() ends the connection: the handler ends quietly (asyncio logs a server
            # callback's cancellation as an error, with a traceback, on every shutdown)
            pass
        except ValueError as error:
            log.warning("bad bootstrap frame: %s", error)
        finally:
            writer.close()
            self._connections.discard(task)


def _answer(entry: _Room, writer: asyncio.StreamWriter, outcome: "asyncio.Future[Outcome]") -> None:
    """Tell the decode that joined a room its outcome, unless its connection closed since (one
    small frame: written without waiting for the buffer to drain)."""
    if writer.is_closing() or outcome.cancelled():
        return
    entry.delivered = True
    write_frame(writer, outcome.result())


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future[Outcome]] = {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        error = "prefill bootstrap connection lost"
        try:
            while True:
                message = await read_frame(self.reader)
                if isinstance(message, RoomReady | RoomFailed):
                    future = self.pending.pop(message.room, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as failure:
            error = f"{error}: {type(failure).__name__}"
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ServiceError(ErrorCode.UNAVAILABLE, error))
            self.pending.clear()
            self.writer.close()

    @property
    def alive(self) -> bool:
        return not self.task.done()


class BootstrapClient:
    """The decode side: one persistent connection per prefill bootstrap endpoint."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._lock = asyncio.Lock()

    async def join(self, host: str, port: int, room: int) -> RoomReady:
        """Wait for the room's KV cache; raises `ServiceError` as soon as prefill fails."""
        connection = await self._connect(host, port)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        connection.pending[room] = future
        write_frame(connection.writer, RoomJoin(room=room))
        await connection.writer.drain()
        try:
            outcome = await future
        except asyncio.CancelledError:
            if connection.alive:  # leave the room: prefill frees it (or forgets an early join)
                write_frame(connection.writer, RoomDone(room=room))
            raise
        finally:
            connection.pending.pop(room, None)
        if isinstance(outcome, RoomFailed):
            raise ServiceError(outcome.code, f"prefill failed: {outcome.message}")
        return outcome

    async def done(self, host: str, port: int, room: int) -> None:
        """Tell prefill the cache was received."""
        connection = await self._connect(host, port)
        write_frame(connection.writer, RoomDone(room=room))
        await connection.writer.drain()

    async def close(self) -> None:
        """Close every connection. Safe to call twice."""
        for connection in self._connections.values():
            connection.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection.task
        self._connections.clear()

    async def _connect(self, host: str, port: int) -> _Connection:
        key = (host, port)
        connection = self._connections.get(key)
        if connection is not None and connection.alive:
            return connection
        async with self._lock:
            connection = self._connections.get(key)
            if connection is None or not connection.alive:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError as error:
                    raise ServiceError(
                        ErrorCode.UNAVAILABLE, f"cannot reach prefill bootstrap {host}:{port}"
                    ) from error
                no_delay(writer)
                connection = _Connection(reader, writer)
                self._connections[key] = connection
            return connection
