"""Structured errors: how a failure travels between processes and reaches the client."""

from enum import IntEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(IntEnum):
    """Error codes follow HTTP status semantics, so the frontend maps them one to one."""

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    PAYLOAD_TOO_LARGE = 413
    CLIENT_CLOSED = 499
    INTERNAL = 500
    UNAVAILABLE = 503
    DEADLINE_EXCEEDED = 504


_OPENAI_TYPES = {
    ErrorCode.BAD_REQUEST: "invalid_request_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorCode.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorCode.CLIENT_CLOSED: "client_closed_request",
    ErrorCode.INTERNAL: "internal_server_error",
    ErrorCode.UNAVAILABLE: "service_unavailable",
    ErrorCode.DEADLINE_EXCEEDED: "timeout",
}


class ErrorInfo(BaseModel):
    """A failure as data: what went wrong, for which request, with which status."""

    model_config = ConfigDict(frozen=True)

    code: int
    """HTTP-style status (see `ErrorCode`)."""
    message: str
    """Human-readable cause; safe to show to the client (no secrets, no tracebacks)."""
    request_id: str = ""
    """The request this error belongs to ("" when unknown)."""
    param: str | None = None
    """The request field at fault (``messages[0].content``), when one is."""
    retry_after_s: float | None = None
    """Set when the cause is load, not a fault: the caller may retry after this many seconds
    (the frontend's ``Retry-After``). A retry elsewhere would only add to the load."""

    @property
    def openai_type(self) -> str:
        """The `type` field of the OpenAI error object for this code."""
        try:
            return _OPENAI_TYPES[ErrorCode(self.code)]
        except ValueError:
            return "internal_server_error" if self.code >= 500 else "invalid_request_error"


class ServiceError(Exception):
    """A failure with an HTTP-style code; raised anywhere, it reaches the client as that status."""

    def __init__(
        self,
        code: int,
        message: str,
        request_id: str = "",
        retry_after_s: float | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.info = ErrorInfo(
            code=code,
            message=message,
            request_id=request_id,
            retry_after_s=retry_after_s,
            param=param,
        )

    @classmethod
    def from_info(cls, info: ErrorInfo) -> "ServiceError":
        """Rebuild the exception from an error received over the wire."""
        return cls(info.code, info.message, info.request_id, info.retry_after_s, param=info.param)

    @property
    def code(self) -> int:
        """HTTP-style status of the failure."""
        return self.info.code

    def __str__(self) -> str:
        return f"{self.info.code}: {self.info.message}"


def over_context(
    prompt_tokens: int, limit: int, max_tokens: int | None = None, *, param: str | None = None
) -> ServiceError:
    """The one 400 for a request its context cannot hold, `limit` tokens with the prompt: the
    frontend's check against the limit the decode workers announce, and each worker's guard."""
    asked = "" if max_tokens is None else f" and max_tokens is {max_tokens}"
    return ServiceError(
        ErrorCode.BAD_REQUEST,
        f"the prompt has {prompt_tokens} tokens{asked}, over the context length of {limit} "
        f"(--max-model-len {limit}; a prompt leaves at least one token to generate)",
        param=param,
    )
