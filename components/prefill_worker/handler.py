"""The prefill worker's request handler."""

from triptych.engines import PrefillEngine
from triptych.protocol import BootstrapInfo, GenerateRequest
from triptych.runtime import Context
from triptych.transfer import ImageEmbeddings, read_simulated


class PrefillHandler:
    """Allocates a room, answers with ``{host, port, room}``, then runs prefill into it."""

    def __init__(self, engine: PrefillEngine) -> None:
        self.engine = engine

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Answer the bootstrap triple first; a later failure reaches decode through the room."""
        room = self.engine.open_room(ctx.request_id)
        host, port = self.engine.bootstrap_address
        await ctx.stream.send(
            BootstrapInfo(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room),
            end=True,
        )
        try:
            embeddings = self._embeddings(request)
        except Exception as error:
            self.engine.abandon_room(room, f"cannot read image embeddings: {error}")
            raise
        await self.engine.prefill(ctx.request_id, request, room, embeddings)

    def _embeddings(self, request: GenerateRequest) -> ImageEmbeddings | None:
        if request.embeddings is None:
            return None
        return read_simulated(request.embeddings)
