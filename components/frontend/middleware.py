"""What every HTTP request passes through: the access log, metrics, JSON errors, the API key."""

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from triptych.observability import metrics
from triptych.protocol import ErrorCode, ErrorInfo, ErrorResponse
from triptych.protocol.openai import ErrorBody

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

access = logging.getLogger("triptych.access")
log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Endpoints probes and scrapers reach without the API key."""


@dataclass
class Exchange:
    """What the access log says about one request; handlers fill it in."""

    request_id: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None


EXCHANGE = web.RequestKey("exchange", Exchange)


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> web.Response:
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
    return web.Response(
        body=body.model_dump_json(),
        status=info.code,
        headers=headers,
        content_type="application/json",
    )


def _plain(error: web.HTTPException, request: web.Request) -> str:
    if error.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if error.status == 405:
        allowed = ", ".join(sorted(getattr(error, "allowed_methods", ()) or ()))
        return f"{request.method} is not allowed on {request.path} (use {allowed})"
    if error.status == 413:
        return "the request body is too large"
    return error.reason


def middlewares(
    api_key: str | None, access_log: bool
) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The frontend's middlewares, outermost first."""

    @web.middleware
    async def log_and_count(request: web.Request, handler: Handler) -> web.StreamResponse:
        """One access-log line and one count per request, by endpoint and status."""
        started = time.perf_counter()
        exchange = request[EXCHANGE] = Exchange()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except BaseException:
            status = 499  # the client went away (or the server stops)
            raise
        finally:
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "unmatched"
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            if access_log:
                _access(request, status, exchange, time.perf_counter() - started)

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error, 404 and 405 included, as an OpenAI error object."""
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
            info = ErrorInfo(code=error.status, message=_plain(error, request))
            return error_response(info, headers)
        except Exception as error:  # a bug of ours: a clean 500, details in our log only
            log.exception("%s %s failed", request.method, request.path, exc_info=error)
            info = ErrorInfo(
                code=ErrorCode.INTERNAL, message=f"internal error ({type(error).__name__})"
            )
            return error_response(info)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        """``Authorization: Bearer <key>`` everywhere but the probes."""
        assert api_key is not None
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(offered.strip(), api_key):
            return await handler(request)
        info = ErrorInfo(
            code=ErrorCode.UNAUTHORIZED,
            message="invalid or missing API key: send 'Authorization: Bearer <key>'",
        )
        return error_response(info, {"WWW-Authenticate": "Bearer"})

    if api_key is None:  # no layer at all: each costs every request a coroutine
        return [log_and_count, json_errors]
    return [log_and_count, json_errors, authenticate]


def _access(request: web.Request, status: int, exchange: Exchange, total_s: float) -> None:
    level = logging.DEBUG if request.path in OPEN_PATHS else logging.INFO
    if not access.isEnabledFor(level):
        return
    fields = [f"{request.method} {request.path} {status}", f"id={exchange.request_id}"]
    if exchange.prompt_tokens is not None:
        fields.append(f"prompt_tokens={exchange.prompt_tokens}")
    if exchange.completion_tokens is not None:
        fields.append(f"completion_tokens={exchange.completion_tokens}")
    if exchange.ttft_s is not None:
        fields.append(f"ttft_ms={exchange.ttft_s * 1e3:.1f}")
    fields.append(f"total_ms={total_s * 1e3:.1f}")
    access.log(level, " ".join(fields))
