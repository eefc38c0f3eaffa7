"""The prefill worker's request handler."""

from triptych.engines import EncodeEngine, PrefillEngine
from triptych.engines.inputs import gather_embeddings
from triptych.observability import nvtx
from triptych.protocol import GenerateRequest
from triptych.runtime import Context
from triptych.transfer import EmbeddingTransport


class PrefillHandler:
    """Allocates a room, answers with ``{host, port, room}``, then runs prefill into it."""

    def __init__(
        self, engine: PrefillEngine, transport: EmbeddingTransport, encoder: EncodeEngine | None
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.encoder = encoder

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Open the room decode chose (or answer the bootstrap triple of a new one); a later
        failure reaches decode through the room."""
        with nvtx.span("mm:prefill:bootstrap"):
            room = self.engine.open_room(request.bootstrap_room)
            if request.bootstrap_room is None:
                await ctx.stream.send(self.engine.bootstrap_info(room), end=True)
                request = request.model_copy(update={"bootstrap_room": room})
        try:
            with nvtx.span("mm:prefill:load_multimodal"):
                embeddings = await gather_embeddings(
                    request, ctx.request_id, self.transport, self.encoder
                )
        except BaseException as error:
            self.engine.abandon_room(room, f"image embeddings unavailable: {error}")
            raise
        with nvtx.span("mm:prefill:engine_async_generate"):
            await self.engine.prefill(ctx.request_id, request, embeddings)
