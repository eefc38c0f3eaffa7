"""Wire types: the OpenAI surface and every message that crosses a process boundary.

Pure data (pydantic v2 models and validators). Nothing here does I/O or imports the rest of
the project; every other layer may import it.
"""

from triptych.protocol.errors import ErrorCode, ErrorInfo, ServiceError
from triptych.protocol.messages import (
    BootstrapInfo,
    EmbeddingHandle,
    GenerateRequest,
    ImageItem,
    KVHandle,
    RoomDone,
    RoomFailed,
    RoomJoin,
    RoomMessage,
    RoomReady,
    TensorHandle,
    TokenChunk,
    decode_chunk,
    encode_chunk,
)
from triptych.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ErrorResponse,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
    Usage,
)
from triptych.protocol.sampling import FinishReason, SamplingOptions

__all__ = [
    "BootstrapInfo",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "EmbeddingHandle",
    "ErrorCode",
    "ErrorInfo",
    "ErrorResponse",
    "FinishReason",
    "GenerateRequest",
    "ImageItem",
    "ImagePart",
    "KVHandle",
    "ModelCard",
    "ModelList",
    "RoomDone",
    "RoomFailed",
    "RoomJoin",
    "RoomMessage",
    "RoomReady",
    "SamplingOptions",
    "ServiceError",
    "TensorHandle",
    "TextPart",
    "TokenChunk",
    "Usage",
    "decode_chunk",
    "encode_chunk",
]
