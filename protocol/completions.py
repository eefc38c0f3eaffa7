"""The OpenAI text-completions surface (``POST /v1/completions``): a prompt in, text out.

The prompt is text or token ids, one or several (each gets ``n`` choices, indexed
``prompt * n + choice``); no chat template is applied and no images are taken. ``echo`` and
``suffix`` are not supported.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from triptych.protocol.openai import Reply, SamplingFields, TokenIdsOut, Usage
from triptych.protocol.sampling import MAX_TOP_LOGPROBS, FinishReason

DEFAULT_MAX_TOKENS = 16
"""Tokens generated when the request sets no ``max_tokens`` (OpenAI's default)."""

TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` body."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return each token's log-probability and this many most likely alternatives."""
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(
        cls, value: str | list[str] | TokenIds | list[TokenIds]
    ) -> str | list[str] | TokenIds | list[TokenIds]:
        if isinstance(value, list) and (not value or any(p in ("", []) for p in value)):
            raise ValueError("must not be empty")
        return value

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: bool | str | None, info: ValidationInfo) -> bool | str | None:
        if value:
            why = " (no insertion)" if info.field_name == "suffix" else ""
            raise ValueError(f"is not supported{why}")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("must equal n (no best-of selection)")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[int(p) for p in prompt]]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    """One choice of a completion, or of a stream chunk."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: TokenIdsOut = None


class CompletionResponse(Reply):
    """A text completion, whole or one stream chunk of it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
