"""Prefill engines that hand KV caches over triptych's own bootstrap rooms (mock, hf)."""

from triptych.engines.base import PrefillEngine
from triptych.transfer import BootstrapServer
from triptych.transfer.bootstrap import new_room


class RoomPrefillEngine(PrefillEngine):
    """Owns a `BootstrapServer`: subclasses call ``super().start()``/``close()`` and offer
    each request's outcome through ``self.server.open(room)``."""

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

    def open_room(self, request_id: str, room: int | None = None) -> int:
        room = new_room() if room is None else room
        self.server.open(room)
        return room

    def abandon_room(self, room: int, reason: str) -> None:
        slot = self.server.open(room)
        slot.fail(reason)
        slot.close()
