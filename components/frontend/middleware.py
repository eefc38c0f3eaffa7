"""What every HTTP request passes through: routing, the API key, JSON errors, the access log and
the request count."""

import hmac
import logging
import math
import time

from triptych.components.frontend.http import (
    BodyTooLarge,
    Exchange,
    Handler,
    Request,
    Response,
    Router,
)
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ErrorInfo, ErrorResponse
from triptych.protocol.openai import ErrorBody

access = logging.getLogger("triptych.access")
log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Endpoints probes and scrapers reach without the API key."""


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI-style error object with the matching status (and ``Retry-After`` when the
    cause is load)."""
    body = ErrorResponse(
        error=ErrorBody(
            message=info.message, type=info.openai_type, param=info.param, code=info.code
        )
    )
    headers = dict(headers or {})
    if info.request_id:
        headers["X-Request-Id"] = info.request_id
    if info.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(info.retry_after_s)))
    return Response(status=info.code, body=body.model_dump_json().encode(), headers=headers)


def refusal(status: int, message: str) -> Response:
    """The answer to a request the HTTP server refuses before routing (malformed, too large)."""
    return error_response(ErrorInfo(code=status, message=message))


def dispatcher(router: Router, api_key: str | None, access_log: bool) -> Handler:
    """Answer a request by its route: 404 and 405 as OpenAI errors, the API key checked
    (everywhere but the probes), a bug as a clean 500; one count and one access-log line each."""

    async def dispatch(request: Request) -> Response:
        started = time.perf_counter()
        status, endpoint = 500, "unmatched"
        try:
            route, request.params, allowed = router.resolve(request.method, request.path)
            if route is None:
                response = _unrouted(request, allowed)
            else:
                endpoint = route.endpoint
                refused = _authenticate(request, api_key)
                response = refused or await route.handler(request)
            status = response.status
            return response
        except BodyTooLarge:
            status = ErrorCode.PAYLOAD_TOO_LARGE
            message = "the request body is too large"
            return error_response(ErrorInfo(code=ErrorCode.PAYLOAD_TOO_LARGE, message=message))
        except ConnectionError:  # the client went away mid-answer: nothing more to send it
            status = ErrorCode.CLIENT_CLOSED
            return Response(streamed=True)
        except BaseException as error:
            if not isinstance(error, Exception):
                status = ErrorCode.CLIENT_CLOSED  # the client went away (or the server stops)
                raise
            # a bug of ours: a clean 500, details in our log only
            log.exception("%s %s failed", request.method, request.path, exc_info=error)
            info = ErrorInfo(
                code=ErrorCode.INTERNAL, message=f"internal error ({type(error).__name__})"
            )
            return error_response(info)
        finally:
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            if access_log:
                _access(request, status, time.perf_counter() - started)

    return dispatch


def _unrouted(request: Request, allowed: list[str]) -> Response:
    if not allowed:
        message = f"no such endpoint: {request.method} {request.path}"
        return error_response(ErrorInfo(code=ErrorCode.NOT_FOUND, message=message))
    methods = ", ".join(allowed)
    message = f"{request.method} is not allowed on {request.path} (use {methods})"
    return error_response(
        ErrorInfo(code=ErrorCode.METHOD_NOT_ALLOWED, message=message), {"Allow": methods}
    )


def _authenticate(request: Request, api_key: str | None) -> Response | None:
    """None when ``Authorization: Bearer <key>`` matches (or no key is set, or the path is a
    probe's); else the 401."""
    if api_key is None or request.path in OPEN_PATHS:
        return None
    scheme, _, offered = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(offered.strip(), api_key):
        return None
    info = ErrorInfo(
        code=ErrorCode.UNAUTHORIZED,
        message="invalid or missing API key: send 'Authorization: Bearer <key>'",
    )
    return error_response(info, {"WWW-Authenticate": "Bearer"})


def _access(request: Request, status: int, total_s: float) -> None:
    level = logging.DEBUG if request.path in OPEN_PATHS else logging.INFO
    if not access.isEnabledFor(level):
        return
    exchange: Exchange = request.exchange
    fields = [f"{request.method} {request.path} {status}", f"id={exchange.request_id}"]
    if exchange.prompt_tokens is not None:
        fields.append(f"prompt_tokens={exchange.prompt_tokens}")
    if exchange.completion_tokens is not None:
        fields.append(f"completion_tokens={exchange.completion_tokens}")
    if exchange.ttft_s is not None:
        fields.append(f"ttft_ms={exchange.ttft_s * 1e3:.1f}")
    fields.append(f"total_ms={total_s * 1e3:.1f}")
    access.log(level, " ".join(fields))
