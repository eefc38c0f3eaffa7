"""The HTTP surface: ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/ready``,
``/metrics``."""

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from triptych.components.frontend.config import FrontendConfig
from triptych.components.frontend.migration import Generation
from triptych.components.frontend.output import Output
from triptych.components.frontend.prompt import Preprocessor
from triptych.components.frontend.telemetry import RequestTelemetry
from triptych.observability import metrics
from triptych.observability.logs import request_id as request_id_var
from triptych.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorCode,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    ImageItem,
    MediaItem,
    ModelCard,
    ModelList,
    ServiceError,
    TokenChunk,
    Usage,
    VideoItem,
)
from triptych.protocol.openai import AssistantMessage, Choice, ChunkChoice, Delta, ErrorBody
from triptych.runtime import Client, Runtime
from triptych.runtime.errors import busy
from triptych.transfer import TransferAgent, image_bytes

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def error_response(info: ErrorInfo) -> web.Response:
    """An OpenAI-style error object with the matching status (and ``Retry-After`` when the
    cause is load)."""
    body = ErrorResponse(
        error=ErrorBody(message=info.message, type=info.openai_type, code=info.code)
    )
    headers = {"X-Request-Id": info.request_id} if info.request_id else {}
    if info.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(info.retry_after_s)))
    return web.Response(
        body=body.model_dump_json(),
        status=info.code,
        headers=headers,
        content_type="application/json",
    )


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first['msg']}"
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def _request_id(offered: str | None) -> str:
    """The client's X-Request-Id when it is safe to use as one, else a fresh id."""
    if offered and _SAFE_ID.fullmatch(offered):
        return offered
    return f"chatcmpl-{uuid.uuid4().hex}"


def _sse(payload: BaseModel) -> bytes:
    return b"data: " + payload.__pydantic_serializer__.to_json(payload) + b"\n\n"


@web.middleware
async def _count_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count every response by endpoint and status."""
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as error:
        metrics.REQUESTS.labels(endpoint, str(error.status)).inc()
        raise
    metrics.REQUESTS.labels(endpoint, str(response.status)).inc()
    return response


@dataclass
class _Exchange:
    """One chat request in flight: what was asked, where answers come from, what came back."""

    chat: ChatCompletionRequest
    generation: Generation
    first: TokenChunk
    """The first chunk, received before anything was sent to the client."""
    rest: AsyncGenerator[TokenChunk]
    output: Output
    prompt_tokens: int
    telemetry: RequestTelemetry

    @property
    def request_id(self) -> str:
        return self.generation.request_id

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        """Token chunks as decode sends them, the first one included."""
        self.telemetry.chunk(len(self.first.token_ids))
        yield self.first
        async for token_chunk in self.rest:
            self.telemetry.chunk(len(token_chunk.token_ids))
            yield token_chunk

    def usage(self) -> Usage:
        """Token counts so far."""
        completion = self.output.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


class Frontend:
    """Routes OpenAI requests into the pipeline and streams the answers back."""

    def __init__(
        self,
        config: FrontendConfig,
        runtime: Runtime,
        preprocessor: Preprocessor,
        stages: dict[str, Client],
        agent: TransferAgent,
    ) -> None:
        self.config = config
        self.agent = agent
        """Holds images and videos too large for a NATS message until an encoder has read
        them."""
        self.runtime = runtime
        self.preprocessor = preprocessor
        self.stages = stages
        self.entry = stages[config.stages[0]]
        self.in_flight = 0
        """Chat requests being served (bounded by ``--max-inflight-requests``)."""

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[_count_requests]
        )
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        return app

    def _affinity(self, request: GenerateRequest) -> list[str]:
        """The content keys the entry instance is chosen by (none: round-robin)."""
        if self.config.image_routing != "affinity":
            return []
        return [image.content_key for image in request.images if image.content_key]

    async def health(self, request: web.Request) -> web.Response:
        """The process is up."""
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 only when every stage of the topology has a live instance."""
        live = {name: len(client.instances.live) for name, client in self.stages.items()}
        status = 200 if all(live.values()) else 503
        return web.json_response(
            {
                "status": "ready" if status == 200 else "not ready",
                "topology": self.config.topology,
                "instances": live,
            },
            status=status,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics of this process."""
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        """The one served model."""
        listing = ModelList(data=[ModelCard(id=self.config.served_model_name)])
        return web.Response(body=listing.model_dump_json(), content_type="application/json")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: streamed (SSE) or whole."""
        request_id = _request_id(request.headers.get("X-Request-Id"))
        request_id_var.set(request_id)
        refusal = self._refusal(request_id)
        if refusal is not None:
            metrics.REJECTED.labels("frontend_full").inc()
            return error_response(refusal.info)
        self.in_flight += 1
        telemetry = RequestTelemetry()
        client_gone = False
        exported: list[MediaItem] = []
        try:
            return await self._chat(request, request_id, telemetry, exported)
        except asyncio.CancelledError:
            client_gone = True
            raise
        finally:
            self.in_flight -= 1
            image_bytes.release(self.agent, exported)
            telemetry.finish(client_gone)

    def _refusal(self, request_id: str) -> ServiceError | None:
        """A busy answer when this frontend already holds as many requests as it may, or as
        every decode instance can hold: refusing at the door costs next to nothing, where a
        request refused by a worker was parsed, tokenized and sent on first."""
        limit = self.config.max_inflight_requests
        if self.in_flight >= limit:
            return busy(
                f"server busy: {self.in_flight} requests in flight "
                f"(--max-inflight-requests {limit})",
                request_id,
            )
        downstream = self.stages["decode"].capacity
        if downstream is not None and self.in_flight >= downstream:
            return busy(
                f"server busy: every decode instance is full ({self.in_flight} requests in flight)",
                request_id,
            )
        return None

    async def _chat(
        self,
        request: web.Request,
        request_id: str,
        telemetry: RequestTelemetry,
        exported: list[MediaItem],
    ) -> web.StreamResponse:
        """Serve one chat request; images and videos it exports to the transfer pool go into
        `exported` (the caller frees them when the request is over, migrations included)."""
        generation: Generation | None = None
        rest: AsyncGenerator[TokenChunk] | None = None
        try:
            try:
                body = await request.read()
                chat = ChatCompletionRequest.model_validate_json(body)
                generate = await self._generate_request(chat, request_id)
                exported.extend(i for i in generate.media if i.data_handle is not None)
                telemetry.prompt(generate)
                generation = Generation(
                    self.runtime,
                    self.entry,
                    generate,
                    request_id,
                    deadline=time.time() + self.config.request_timeout_s,
                    migration_limit=self.config.migration_limit,
                    affinity=self._affinity(generate),
                )
                await generation.start()
                log.debug(
                    "accepted by %s instance %s (%d prompt tokens)",
                    self.entry.component,
                    generation.instance,
                    len(generate.token_ids),
                )
                # Nothing reaches the client before the first chunk: until then a failure is
                # still a plain HTTP error (a 503 with Retry-After when the cause is load), and
                # a lost instance costs only a migration.
                rest = generation.chunks()
                first = await anext(rest)
            except Exception as error:
                return self._failure(error, request_id)
            output = Output(self.preprocessor.tokenizer, generate.sampling.stop)
            exchange = _Exchange(
                chat, generation, first, rest, output, len(generate.token_ids), telemetry
            )
            if chat.stream:
                return await self._stream(request, exchange)
            return await self._complete(exchange)
        finally:
            if rest is not None:
                await rest.aclose()
            if generation is not None:
                await generation.close()

    def _failure(self, error: Exception, request_id: str) -> web.Response:
        """The HTTP answer for a request that failed before anything was sent."""
        if isinstance(error, web.HTTPRequestEntityTooLarge):
            info = ErrorInfo(
                code=ErrorCode.PAYLOAD_TOO_LARGE,
                message=f"request body is over {self.config.max_body_bytes} bytes",
            )
        elif isinstance(error, ValidationError):
            info = ErrorInfo(code=ErrorCode.BAD_REQUEST, message=_validation_message(error))
        elif isinstance(error, ServiceError):
            info = error.info
            if info.retry_after_s is not None:
                metrics.REJECTED.labels("workers_full").inc()
        elif isinstance(error, StopAsyncIteration):
            info = ErrorInfo(code=ErrorCode.INTERNAL, message="the stream ended without output")
        else:  # a bug of ours: a clean 500, details in our log only
            log.exception("request %s failed before streaming", request_id, exc_info=error)
            info = ErrorInfo(
                code=ErrorCode.INTERNAL, message=f"internal error ({type(error).__name__})"
            )
        return error_response(info.model_copy(update={"request_id": request_id}))

    async def _generate_request(
        self, chat: ChatCompletionRequest, request_id: str
    ) -> GenerateRequest:
        if chat.model != self.config.served_model_name:
            raise ServiceError(
                ErrorCode.NOT_FOUND,
                f"model '{chat.model}' does not exist; "
                f"this server serves '{self.config.served_model_name}'",
            )
        prompt = await self.preprocessor.prompt(chat)
        room = self.preprocessor.context_length - len(prompt.token_ids)
        wanted = chat.requested_max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                (
                    f"the prompt has {len(prompt.token_ids)} tokens and max_tokens is "
                    f"{wanted}, over the context length of {self.preprocessor.context_length}"
                ),
            )
        items: list[MediaItem] = [*prompt.images, *prompt.videos]
        media = await image_bytes.offload(
            self.agent,
            items,
            f"img-{request_id}",
            self.config.inline_image_bytes,
        )
        return GenerateRequest(
            model=chat.model,
            token_ids=prompt.token_ids,
            images=[item for item in media if isinstance(item, ImageItem)],
            videos=[item for item in media if isinstance(item, VideoItem)],
            sampling=chat.sampling(wanted or room),
            eos_token_ids=self.preprocessor.eos_token_ids,
        )

    async def _complete(self, exchange: _Exchange) -> web.Response:
        chat, output = exchange.chat, exchange.output
        try:
            async for token_chunk in exchange.chunks():
                output.add(token_chunk)
                if output.finished:
                    break
        except ServiceError as error:
            return error_response(error.info.model_copy(update={"request_id": exchange.request_id}))
        response = ChatCompletionResponse(
            id=exchange.request_id,
            model=chat.model,
            choices=[
                Choice(
                    message=AssistantMessage(content="".join(output.text)),
                    finish_reason=output.finish_reason,
                    token_ids=output.token_ids if chat.return_token_ids else None,
                )
            ],
            usage=exchange.usage(),
        )
        return web.Response(
            body=response.model_dump_json(),
            content_type="application/json",
            headers={"X-Request-Id": exchange.request_id},
        )

    async def _stream(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        chat, output, request_id = exchange.chat, exchange.output, exchange.request_id
        response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request_id})
        await response.prepare(request)
        created = int(time.time())

        def chunk(
            delta: Delta, finish: Any = None, ids: list[int] | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=request_id,
                created=created,
                model=chat.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish, token_ids=ids)],
            )

        await response.write(_sse(chunk(Delta(role="assistant", content=""))))
        try:
            async for token_chunk in exchange.chunks():
                text = output.add(token_chunk)
                ids = token_chunk.token_ids if chat.return_token_ids else None
                if text or output.finished or ids:
                    delta = Delta(content=text)
                    await response.write(_sse(chunk(delta, output.finish_reason, ids)))
                if output.finished:
                    break
        except ServiceError as error:
            info = error.info.model_copy(update={"request_id": request_id})
            body = ErrorResponse(
                error=ErrorBody(message=info.message, type=info.openai_type, code=info.code)
            )
            await response.write(_sse(body))
        else:
            if chat.include_usage:
                final = ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=chat.model,
                    choices=[],
                    usage=exchange.usage(),
                )
                await response.write(_sse(final))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
