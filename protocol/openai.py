"""The OpenAI chat-completions surface: requests, responses, stream chunks, models, errors.

Requests accept what clients send: every field OpenAI defines, ``null`` for "the default",
values that change nothing (``response_format: {"type": "text"}``, ``tool_choice: "none"``,
empty ``tools``), and fields nobody defined (kept in ``model_extra`` for the frontend to log).
``response_format`` ``json_object`` and ``json_schema`` are enforced while decoding. What
triptych cannot honour (tools, logit bias, audio) is refused with a message that names the
field.
"""

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from triptych.protocol.sampling import (
    FINITE_FIELDS,
    MAX_TOP_LOGPROBS,
    FinishReason,
    ResponseFormat,
    SamplingOptions,
    check_finite,
)

MAX_CHOICES = 16
"""Most choices (``n``) one request may ask for."""


class TextPart(BaseModel):
    """A text content part."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class MediaURL(BaseModel):
    """Where a picture or a video comes from: ``http(s)://``, ``data:<image or
    video>/...;base64,`` or ``file://``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)


class ImageURL(MediaURL):
    """Where an image comes from, and the detail OpenAI lets a client ask for."""

    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image content part."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(BaseModel):
    """A video content part (as vLLM and SGLang accept it)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation. ``developer`` (OpenAI's newer name) is ``system``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role

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
    """``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


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


class SamplingDefaults(BaseModel):
    """Sampling values the checkpoint recommends (its ``generation_config.json``); they apply
    when a request leaves a field out or sends ``null``."""

    model_config = ConfigDict(frozen=True)

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """From ``max_new_tokens``: a cap on generated tokens when the request sets none."""

    def effective(self) -> dict[str, Any]:
        """The values that are set."""
        return self.model_dump(exclude_none=True)


def _refuse_unless_empty(value: object, what: str) -> None:
    if value not in (None, [], {}):
        raise ValueError(f"is not supported ({what}); send it empty or leave it out")


class SamplingFields(BaseModel):
    """Fields chat and text completions share. ``null`` or absent: the model's default."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = False
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool | None = False
    """Extension (as in vLLM): include the generated token ids in each choice or chunk."""
    response_format: ResponseFormatParam | None = None

    @field_validator(*FINITE_FIELDS)
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        check_finite(value)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > 16 or any(not s for s in strings):
            raise ValueError("takes at most 16 non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        _refuse_unless_empty(value, "no logit bias")
        return value

    @property
    def choices(self) -> int:
        """How many choices to generate."""
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(
        self,
        max_tokens: int,
        defaults: SamplingDefaults | None = None,
        *,
        logprobs: int | None = None,
        choice: int = 0,
    ) -> SamplingOptions:
        """The sampling options to send downstream for choice number `choice`: `max_tokens`
        resolved, silent fields from `defaults` (then OpenAI's), and a seed of its own for
        each choice (``seed + choice``) so that seeded choices differ but repeat."""
        model = defaults or SamplingDefaults()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = _first(self.top_k, model.top_k, 0)
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=_first(self.temperature, model.temperature, 1.0),
            top_p=_first(self.top_p, model.top_p, 1.0),
            top_k=max(top_k, 0),
            min_p=_first(self.min_p, model.min_p, 0.0),
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=_first(self.repetition_penalty, model.repetition_penalty, 1.0),
            logprobs=logprobs,
            response_format=resolve_format(self.response_format),
        )


def _first(*values: Any) -> Any:
    return next(value for value in values if value is not None)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Extension (as in vLLM and SGLang): extra variables for the chat template
    (``{"enable_thinking": false}``)."""
    add_generation_prompt: bool | None = True
    """Extension: end the prompt with the assistant's turn opener (the default)."""
    continue_final_message: bool | None = False
    """Extension: continue the last (assistant) message instead of starting a new turn."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs': true")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        _refuse_unless_empty(value, "no tool calling")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, "none", "auto"):
            return value
        raise ValueError("must be 'none' or 'auto' (tool calling is not supported)")

    @field_validator("audio", "prediction")
    @classmethod
    def _nothing(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError("is not supported by this server")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and set(value) - {"text"}:
            raise ValueError("may only list 'text' (no audio output)")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _continue_alone(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError(
                "cannot be true together with 'add_generation_prompt' (set it to false)"
            )
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the legacy ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives per token the engines must return (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``."""

    cached_tokens: int = 0
    """Prompt tokens whose KV cache came from an engine's prefix cache (each prompt once)."""


class Usage(BaseModel):
    """Token counts, from the tokenizer (never words)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(BaseModel):
    """A generated token's log-probability and the most likely tokens at its position."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """The ``logprobs`` of a choice or a chunk's choice."""

    content: list[ChatLogprob] | None
    refusal: None = None


def _is_none(value: object) -> bool:
    return value is None


TokenIdsOut = Annotated[list[int] | None, Field(exclude_if=_is_none)]
"""Generated token ids, when the request asked for them (`return_token_ids`, an extension
vLLM clients send); left out of the JSON otherwise, as OpenAI's own replies have no such key."""


class AssistantMessage(BaseModel):
    """The generated message of a non-streamed response."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """One choice of a non-streamed response."""

    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    token_ids: TokenIdsOut = None


def _now() -> int:
    return int(time.time())


class Reply(BaseModel):
    """What every completion, whole or one stream chunk, starts with: its id, its ``object``
    kind (each reply type fixes it), when it was made, and the model that made it."""

    id: str
    object: str
    created: int = Field(default_factory=_now)
    model: str


class ChatCompletionResponse(Reply):
    """A non-streamed chat completion."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """The increment carried by a stream chunk."""

    role: Annotated[Literal["assistant"] | None, Field(exclude_if=_is_none)] = None
    """Only the first chunk of a choice names the role; the others leave the key out."""
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice of a stream chunk."""

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: TokenIdsOut = None
    """The chunk's new token ids."""


class ChatCompletionChunk(Reply):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "triptych"
    root: str | None = None
    """Where the weights come from: the hub ID or the checkpoint directory."""
    max_model_len: int | None = None
    """Tokens a sequence may hold, prompt included."""
    sampling_defaults: dict[str, Any] = {}
    """What a request that leaves a sampling field out gets (from the checkpoint's
    ``generation_config.json``; OpenAI's defaults for the rest)."""


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
