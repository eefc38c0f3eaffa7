"""The encode worker's request handler."""

from triptych.engines import EncodeEngine
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.runtime import Client, Context
from triptych.transfer import publish_simulated


class EncodeHandler:
    """Embeds a request's images, then hands the request (and its stream) to decode."""

    def __init__(self, engine: EncodeEngine, decode: Client) -> None:
        self.engine = engine
        self.decode = decode

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Encode (if there are images) and forward to a decode instance."""
        if request.images and request.embeddings is None:
            embeddings = await self.engine.encode(ctx.request_id, request.images)
            expected = sum(image.num_tokens for image in request.images)
            if embeddings.num_tokens != expected:
                raise ServiceError(
                    ErrorCode.INTERNAL,
                    f"vision tower returned {embeddings.num_tokens} rows for {expected} tokens",
                )
            images = [image.model_copy(update={"data": None}) for image in request.images]
            request = request.model_copy(
                update={"images": images, "embeddings": publish_simulated(embeddings)}
            )
        await self.decode.forward(request, ctx.stream, ctx.deadline)
