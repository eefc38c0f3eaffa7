"""The encode worker's request handler."""

from triptych.engines import EncodeEngine
from triptych.observability import metrics, nvtx
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.runtime import Client, Context
from triptych.transfer import EmbeddingTransport


class EncodeHandler:
    """Embeds a request's images and videos, then hands the request (and its stream) to
    decode.

    The embeddings stay in this worker's registered memory until the reader's completion
    notification (or a timeout, or a cancel) frees them.
    """

    def __init__(self, engine: EncodeEngine, decode: Client, transport: EmbeddingTransport):
        self.engine = engine
        self.decode = decode
        self.transport = transport

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Encode (if there are images or videos) and forward to a decode instance."""
        with nvtx.span("mm:enc:generate"):
            await self._generate(request, ctx)

    async def _generate(self, request: GenerateRequest, ctx: Context) -> None:
        if not request.media or request.embeddings is not None:
            await self.decode.forward(request, ctx.stream, ctx.deadline)
            return
        images = await self.transport.fetch_images(request.images)
        videos = await self.transport.fetch_images(request.videos)
        with nvtx.span("mm:enc:vision_encode"):
            embeddings = await self.engine.encode(ctx.request_id, images, videos)
        metrics.IMAGES_ENCODED.inc(len(request.images))
        metrics.VIDEOS_ENCODED.inc(len(request.videos))
        metrics.VIDEO_FRAMES_ENCODED.inc(sum(len(video.frame_indices) for video in videos))
        expected = request.media_tokens
        if embeddings.num_tokens != expected:
            raise ServiceError(
                ErrorCode.INTERNAL,
                f"vision tower returned {embeddings.num_tokens} rows for {expected} tokens",
            )
        handle = None
        try:
            with nvtx.span("mm:enc:embedding_transfer"):
                handle = await self.transport.publish(embeddings, key=f"emb-{ctx.request_id}")
                spent = {"data": None, "data_handle": None}
                images = [image.model_copy(update=spent) for image in request.images]
                videos = [video.model_copy(update=spent) for video in request.videos]
                update = {"images": images, "videos": videos, "embeddings": handle}
                await self.decode.forward(
                    request.model_copy(update=update),
                    ctx.stream,
                    ctx.deadline,
                )
            await self.transport.released(handle, ctx.deadline)
        finally:
            if handle is not None:
                self.transport.release(handle)
