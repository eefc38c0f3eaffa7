"""Wire types: the OpenAI surface and every message that crosses a process boundary.

Pure data (pydantic v2 models and validators); `settings`, how a config field declares its
command-line flag; and `local`, how peers on one host reach each other's endpoints (the one
module that opens sockets). Nothing here imports the rest of the project; every other layer
may import it.
"""

if __name__ != "triptych.protocol":  # the folder is reached only through the package
    raise ImportError(f"import triptych.protocol, not {__name__} (docs/architecture.md)")

from triptych.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from triptych.protocol.errors import ErrorCode, ErrorInfo, ServiceError, over_context
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
    TokenLogprob,
    VideoItem,
    decode_chunk,
    encode_chunk,
)
from triptych.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatMessage,
    ChoiceLogprobs,
    ErrorResponse,
    ImagePart,
    ModelCard,
    ModelList,
    SamplingDefaults,
    SamplingFields,
    TextPart,
    TopLogprob,
    Usage,
    VideoPart,
)
from triptych.protocol.sampling import (
    MAX_TOP_LOGPROBS,
    FinishReason,
    ResponseFormat,
    SamplingOptions,
)

__all__ = [
    "MAX_TOP_LOGPROBS",
    "BootstrapInfo",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprob",
    "ChatMessage",
    "ChoiceLogprobs",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
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
    "SamplingDefaults",
    "SamplingFields",
    "SamplingOptions",
    "ServiceError",
    "TensorHandle",
    "TextPart",
    "TokenChunk",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "VideoItem",
    "VideoPart",
    "decode_chunk",
    "encode_chunk",
    "over_context",
]
