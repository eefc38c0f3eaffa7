"""Errors of the runtime. `ServiceError` lives in the protocol so every layer can raise it."""

from triptych.protocol import ErrorCode, ServiceError

__all__ = ["RETRY_AFTER_S", "ServiceError", "busy", "deadline_exceeded", "unavailable"]

RETRY_AFTER_S = 1.0
"""What a refusal for load tells the caller to wait before trying again."""


def unavailable(message: str, request_id: str = "") -> ServiceError:
    """No instance could take the call, or the one that had it went away."""
    return ServiceError(ErrorCode.UNAVAILABLE, message, request_id)


def deadline_exceeded(request_id: str = "") -> ServiceError:
    """The call's deadline passed before it completed."""
    return ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded", request_id)


def busy(message: str, request_id: str = "") -> ServiceError:
    """Every queue that could take the call is full: try again later (503 with Retry-After)."""
    return ServiceError(ErrorCode.UNAVAILABLE, message, request_id, retry_after_s=RETRY_AFTER_S)
