"""The OpenAI chat-completions surface: requests, responses, stream chunks, models, errors.

Requests reject what triptych cannot honour (``n > 1``, logprobs, tools, unknown roles or
content types) with a clear message instead of ignoring it.
"""

import json
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from triptych.protocol.sampling import FinishReason, ResponseFormat, SamplingOptions


class TextPart(BaseModel):
    """A text content part."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """Where an image comes from: ``http(s)://``, ``data:image/...;base64,`` or ``file://``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image content part."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    """Where a video comes from: ``http(s)://``, ``data:video/...;base64,`` or ``file://``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)


class VideoPart(BaseModel):
    """A video content part (as vLLM and SGLang accept it)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content must not be an empty list")
        if self.role != "user" and self.images:
            raise ValueError(f"images are only accepted in user messages, not {self.role}")
        if self.role != "user" and self.videos:
            raise ValueError(f"videos are only accepted in user messages, not {self.role}")
        return self

    @property
    def images(self) -> list[ImagePart]:
        """The image parts of this message, in order."""
        if not isinstance(self.content, list):
            return []
        return [part for part in self.content if isinstance(part, ImagePart)]

    @property
    def videos(self) -> list[VideoPart]:
        """The video parts of this message, in order."""
        if not isinstance(self.content, list):
            return []
        return [part for part in self.content if isinstance(part, VideoPart)]


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` exists."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class TextFormat(BaseModel):
    """``response_format: {"type": "text"}``: free text (the default)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """``response_format: {"type": "json_object"}``: any JSON object."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JsonSchema(BaseModel):
    """The ``json_schema`` member of a ``json_schema`` response format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = False


class JsonSchemaFormat(BaseModel):
    """``response_format: {"type": "json_schema", "json_schema": {...}}``: JSON that validates
    against the schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormatParam = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


def resolve_format(value: ResponseFormatParam | None) -> ResponseFormat | None:
    """What travels downstream for a request's ``response_format`` (None for free text)."""
    if isinstance(value, JsonObjectFormat):
        return ResponseFormat(type="json_object")
    if isinstance(value, JsonSchemaFormat):
        spec = value.json_schema
        schema = spec.schema_
        return ResponseFormat(
            type="json_schema",
            schema_text=json.dumps(schema, sort_keys=True, separators=(",", ":")),
            name=spec.name,
            strict=bool(spec.strict),
        )
    return None


_UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "top_logprobs",
    "audio",
    "modalities",
    "prediction",
)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    n: int = 1
    logprobs: bool = False
    user: str | None = None
    return_token_ids: bool = False
    """Extension (as in vLLM): include the generated token ids in each choice or chunk."""
    response_format: ResponseFormatParam | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in _UNSUPPORTED:
                if data.get(name) not in (None, [], {}):
                    raise ValueError(f"'{name}' is not supported by this server")
        return data

    @field_validator(
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > 16 or any(not s for s in strings):
            raise ValueError("stop takes at most 16 non-empty strings")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the legacy ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int) -> SamplingOptions:
        """The sampling options to send downstream, with ``max_tokens`` resolved."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            response_format=resolve_format(self.response_format),
        )


class Usage(BaseModel):
    """Token counts, from the tokenizer (never words)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The generated message of a non-streamed response."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """The single choice of a non-streamed response."""

    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None
    token_ids: list[int] | None = None
    """Generated token ids, when the request asked for them (`return_token_ids`)."""


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    """A non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """The increment carried by a stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """The single choice of a stream chunk."""

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None
    token_ids: list[int] | None = None
    """The chunk's new token ids, when the request asked for them (`return_token_ids`)."""


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "triptych"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """The ``error`` member of an OpenAI error response."""

    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    """An OpenAI-style error object."""

    error: ErrorBody
