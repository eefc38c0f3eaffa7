"""Prefill engines that hand KV caches over triptych's own bootstrap rooms (mock, hf, and
sglang for the outcome: SGLang moves the cache itself)."""

import abc

from triptych.engines.base import PrefillEngine
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.transfer import BootstrapServer, ImageEmbeddings, PrefillRoom
from triptych.transfer.bootstrap import new_room


class RoomPrefillEngine(PrefillEngine):
    """Owns a `BootstrapServer`: subclasses call ``super().start()``/``close()`` and run each
    request's prefill in `fill_room`, which publishes the outcome in the request's room."""

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

    async def prefill(
        self,
        request_id: str,
        request: GenerateRequest,
        room: int,
        embeddings: ImageEmbeddings | None,
    ) -> None:
        opened = self.server.open(room)
        try:
            await self.fill_room(request_id, request, opened, embeddings)
        except BaseException as error:
            code = error.code if isinstance(error, ServiceError) else ErrorCode.INTERNAL
            opened.fail(f"prefill failed: {error}" if str(error) else "prefill cancelled", code)
            raise
        finally:
            opened.close()

    @abc.abstractmethod
    async def fill_room(
        self,
        request_id: str,
        request: GenerateRequest,
        room: PrefillRoom,
        embeddings: ImageEmbeddings | None,
    ) -> None:
        """Prefill and tell `room` the KV cache is ready (holding it until decode has read it,
        where the engine hands it over itself). A failure raised here reaches decode through
        the room at once."""
