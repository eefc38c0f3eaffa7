"""Prefill engines that hand KV caches over triptych's own bootstrap rooms (mock, hf, and
sglang for the outcome: SGLang moves the cache itself)."""

import contextlib
from collections.abc import AsyncIterator

from triptych.engines.base import PrefillEngine
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.transfer import BootstrapServer, PrefillRoom
from triptych.transfer.bootstrap import new_room


class RoomPrefillEngine(PrefillEngine):
    """Owns a `BootstrapServer`: subclasses call ``super().start()``/``close()`` and run each
    request's prefill inside `filling` its room, publishing the outcome there."""

    def __init__(
        self, bootstrap_host: str, bootstrap_port: int, advertise_host: str | None = None
    ) -> None:
        self.server = BootstrapServer(bootstrap_host, bootstrap_port, advertise_host)

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()

    @property
    def bootstrap_address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    def open_room(self, room: int | None = None) -> int:
        room = new_room() if room is None else room
        self.server.open(room)
        return room

    def abandon_room(self, room: int, reason: str) -> None:
        opened = self.server.open(room)
        opened.fail(reason)
        opened.close()

    @contextlib.asynccontextmanager
    async def filling(self, request: GenerateRequest) -> AsyncIterator[PrefillRoom]:
        """Prefill's side of the request's room while a prefill fills it: a failure raised
        inside reaches decode through the room at once, and the room closes on the way out."""
        assert request.bootstrap_room is not None, "open_room() first"
        opened = self.server.open(request.bootstrap_room)
        try:
            yield opened
        except BaseException as error:
            code = error.code if isinstance(error, ServiceError) else ErrorCode.INTERNAL
            opened.fail(f"prefill failed: {error}" if str(error) else "prefill cancelled", code)
            raise
        finally:
            opened.close()
