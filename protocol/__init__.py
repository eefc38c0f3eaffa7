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
    MediaItem,
    RoomDone,
    RoomFailed,
    RoomJoin,
    RoomMessage,
    RoomReady,
    TensorHandle,
    TokenChunk,
    VideoItem,
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
    VideoPart,
)
from triptych.protocol.sampling import FinishReason, ResponseFormat, SamplingOptions

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
    "MediaItem",
    "ModelCard",
    "ModelList",
    "ResponseFormat",
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
    "VideoItem",
    "VideoPart",
]
