"""The encode worker's request handler."""

from triptych.engines import EncodeEngine
from triptych.observability import metrics, nvtx
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.runtime import Client, Context
from triptych.transfer import EmbeddingTransport


class EncodeHandler:
    """Embeds a request's images, then hands the request (and its stream) to decode.

    The embeddings stay in this worker's registered memory until the reader's completion
    notification (or a timeout, or a cancel) frees them.
    """

    def __init__(self, engine: EncodeEngine, decode: Client, transport: EmbeddingTransport):
        self.engine = engine
        self.decode = decode
        self.transport = transport

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Encode (if there are images) and forward to a decode instance."""
        with nvtx.span("mm:enc:generate"):
            await self._generate(request, ctx)

    async def _generate(self, request: GenerateRequest, ctx: Context) -> None:
        if not request.images or request.embeddings is not None:
            await self.decode.forward(request, ctx.stream, ctx.deadline)
            return
        images = await self.transport.fetch_images(request.images)
        with nvtx.span("mm:enc:vision_encode"):
            embeddings = await self.engine.encode(ctx.request_id, images)
        metrics.IMAGES_ENCODED.inc(len(request.images))
        expected = sum(image.num_tokens for image in request.images)
        if embeddings.num_tokens != expected:
            raise ServiceError(
                ErrorCode.INTERNAL,
                f"vision tower returned {embeddings.num_tokens} rows for {expected} tokens",
            )
        handle = None
        try:
            with nvtx.span("mm:enc:embedding_transfer"):
                handle = await self.transport.publish(embeddings, key=f"emb-{ctx.request_id}")
                images = [
                    image.model_copy(update={"data": None, "data_handle": None})
                    for image in request.images
                ]
                await self.decode.forward(
                    request.model_copy(update={"images": images, "embeddings": handle}),
                    ctx.stream,
                    ctx.deadline,
                )
            await self.transport.released(handle, ctx.deadline)
        finally:
            if handle is not None:
                self.transport.release(handle)
