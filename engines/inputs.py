"""A request's image and video embeddings, wherever they are: transferred, or still to be
encoded."""

from triptych.engines.base import EncodeEngine
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.transfer import EmbeddingTransport, ImageEmbeddings


async def gather_embeddings(
    request: GenerateRequest,
    request_id: str,
    transport: EmbeddingTransport,
    encoder: EncodeEngine | None,
) -> ImageEmbeddings | None:
    """Read the embeddings an encode worker published, or encode the images and videos here.

    A worker with a dedicated encoder (`encoder` None) refuses images that were not encoded.
    """
    if request.embeddings is not None:
        embeddings = await transport.read(request.embeddings)
    elif not request.images and not request.videos:
        return None
    elif encoder is None:
        raise ServiceError(
            ErrorCode.INTERNAL, "images arrived unencoded at a worker with a dedicated encoder"
        )
    else:
        embeddings = await encoder.encode(
            request_id,
            await transport.fetch_images(request.images),
            await transport.fetch_images(request.videos),
        )
    expected = request.media_tokens
    if embeddings.num_tokens != expected:
        raise ServiceError(
            ErrorCode.INTERNAL,
            f"{embeddings.num_tokens} embedding rows for {expected} image tokens",
        )
    return embeddings
