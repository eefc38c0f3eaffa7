"""Errors of the runtime. `ServiceError` lives in the protocol so every layer can raise it."""

from triptych.protocol import ErrorCode, ServiceError

__all__ = ["ServiceError", "deadline_exceeded", "unavailable"]


def unavailable(message: str, request_id: str = "") -> ServiceError:
    """No instance could take the call, or the one that had it went away."""
    return ServiceError(ErrorCode.UNAVAILABLE, message, request_id)


def deadline_exceeded(request_id: str = "") -> ServiceError:
    """The call's deadline passed before it completed."""
    return ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded", request_id)
