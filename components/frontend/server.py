"""The HTTP surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/models/{id}``, ``/health``, ``/ready``, ``/metrics``."""

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from triptych.components.frontend.chat import ChatReply
from triptych.components.frontend.choices import Choices
from triptych.components.frontend.completions import CompletionReply
from triptych.components.frontend.config import FrontendConfig
from triptych.components.frontend.group import Group
from triptych.components.frontend.http import BodyTooLarge, Handler, Request, Response, Router
from triptych.components.frontend.invalid import describe
from triptych.components.frontend.logprobs import TokenText
from triptych.components.frontend.middleware import dispatcher, error_response
from triptych.components.frontend.output import Output
from triptych.components.frontend.prompt import Preprocessor, Prompt
from triptych.components.frontend.reply import Reply
from triptych.components.frontend.telemetry import RequestTelemetry
from triptych.components.topology import GENERATES
from triptych.engines import grammar
from triptych.models.prefix import route_keys
from triptych.observability import metrics
from triptych.observability.logs import request_id as request_id_var
from triptych.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorCode,
    ErrorInfo,
    GenerateRequest,
    ImageItem,
    MediaItem,
    ModelCard,
    ModelList,
    SamplingFields,
    ServiceError,
    VideoItem,
    over_context,
)
from triptych.protocol.openai import resolve_format
from triptych.runtime import Client, Runtime
from triptych.runtime.errors import busy
from triptych.transfer import TransferAgent, image_bytes

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_UNKNOWN_NAMES = 256
"""Unknown field names remembered (each is logged once); beyond, no more are logged."""


def _request_id(offered: str | None, prefix: str) -> str:
    """The client's X-Request-Id when it is safe to use as one, else a fresh id."""
    if offered and _SAFE_ID.fullmatch(offered):
        return offered
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class _Plan:
    """What one request asks of the pipeline, and how to answer it."""

    fields: SamplingFields
    prompts: list[Prompt]
    """Each distinct prompt (one for chat; one per prompt for completions)."""
    requests: list[GenerateRequest]
    """One per choice: ``n`` per prompt, in choice-index order."""
    reply: type[Reply]
    logprobs: bool
    exported: list[MediaItem] = field(default_factory=list)
    """Images waiting in the transfer pool for their encoders (freed when the request ends)."""


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
        self.token_text = TokenText(preprocessor.tokenizer)
        self.in_flight = 0
        """Requests being served (bounded by ``--max-inflight-requests``)."""
        self.group: Group | None = None
        """The other processes serving the same port, if any (``--frontend-processes``)."""
        self._unknown_fields: set[str] = set()

    def handler(self) -> Handler:
        """Every endpoint, behind the dispatcher (routing, API key, errors, access log)."""
        router = Router()
        router.add("POST", "/v1/chat/completions", self.chat_completions)
        router.add("POST", "/v1/completions", self.completions)
        router.add("GET", "/v1/models", self.models)
        router.add("GET", "/v1/models/{model_id}", self.model)
        router.add("GET", "/health", self.health)
        router.add("GET", "/ready", self.ready)
        router.add("GET", "/metrics", self.metrics)
        return dispatcher(router, self.config.api_key, self.config.access_log)

    def _affinity(self, request: GenerateRequest, entry: Client) -> list[str]:
        """The content keys `entry`'s instance is chosen by (none: round-robin): an encoder by
        the images' content keys, an aggregated worker (EPD, E/PD text) by the prompt's
        beginning, which its prefix cache may hold."""
        if entry.component == "encode":
            if self.config.image_routing != "affinity":
                return []
            return [image.content_key for image in request.images if image.content_key]
        aggregated = self.config.topology in ("EPD", "E/PD")
        if aggregated and self.config.prefix_routing == "affinity" and entry.has_choice:
            return route_keys(request)
        return []

    async def health(self, request: Request) -> Response:
        """The process is up."""
        return Response(body=b'{"status": "ok"}')

    async def ready(self, request: Request) -> Response:
        """200 only when every stage of the topology has a live instance (and every process of
        the frontend's group is up)."""
        live = {name: len(client.instances.live) for name, client in self.stages.items()}
        ready = all(live.values())
        state: dict[str, object] = {"topology": self.config.topology, "instances": live}
        if self.group is not None:
            processes = len(self.group.members())
            ready = ready and processes >= self.group.size
            state["frontend_processes"] = processes
        state = {"status": "ready" if ready else "not ready", **state}
        return Response(status=200 if ready else 503, body=json.dumps(state).encode())

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics of the frontend: of this process, or summed over its group."""
        text = await self.group.metrics() if self.group else generate_latest()
        return Response(body=text, content_type=CONTENT_TYPE_LATEST)

    def _card(self) -> ModelCard:
        defaults = {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            **self.preprocessor.sampling_defaults.effective(),
        }
        return ModelCard(
            id=self.config.served_model_name,
            root=self.config.model_source,
            max_model_len=self.context_length,
            sampling_defaults=defaults,
        )

    async def models(self, request: Request) -> Response:
        """The one served model."""
        return Response(body=ModelList(data=[self._card()]).model_dump_json().encode())

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: the served model, or 404."""
        wanted = request.params["model_id"]
        if wanted != self.config.served_model_name:
            return error_response(self._unknown_model(wanted).info)
        return Response(body=self._card().model_dump_json().encode())

    def _unknown_model(self, name: str) -> ServiceError:
        return ServiceError(
            ErrorCode.NOT_FOUND,
            f"model '{name}' does not exist; this server serves '{self.config.served_model_name}'",
            param="model",
        )

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: streamed (SSE) or whole."""
        return await self._serve(request, "chatcmpl", self._chat_plan)

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: streamed (SSE) or whole."""
        return await self._serve(request, "cmpl", self._completion_plan)

    async def _serve(
        self,
        request: Request,
        prefix: str,
        plan: Callable[[bytes, str], Awaitable[_Plan]],
    ) -> Response:
        request_id = _request_id(request.headers.get("x-request-id"), prefix)
        request_id_var.set(request_id)
        exchange = request.exchange
        exchange.request_id = request_id
        refusal = self._refusal(request_id)
        if refusal is not None:
            metrics.REJECTED.labels("frontend_full").inc()
            return error_response(refusal.info)
        self.in_flight += 1
        telemetry = RequestTelemetry()
        client_gone = False
        try:
            return await self._answer(request, request_id, telemetry, plan)
        except asyncio.CancelledError:
            client_gone = True
            raise
        finally:
            self.in_flight -= 1
            telemetry.finish(client_gone)
            exchange.ttft_s = telemetry.ttft_s

    def entry_for(self, requests: list[GenerateRequest]) -> Client:
        """The stage requests enter at: text goes straight to decode (past the encoder, when the
        topology has one); requests with images or videos go to the topology's entry stage."""
        if any(r.media for r in requests):
            return self.entry
        return self.stages[self.config.text_entry]

    def _refusal(self, request_id: str) -> ServiceError | None:
        """A busy answer when this frontend already holds as many requests as it may, or as
        every decode instance can hold: refusing at the door costs next to nothing, where a
        request refused by a worker was parsed, tokenized and sent on first. A group of frontend
        processes shares both limits out."""
        limit = self.config.max_inflight_requests
        share = self.group.share if self.group else int
        of_group = f" shared by {self.group.size} processes" if self.group else ""
        if self.in_flight >= share(limit):
            return busy(
                f"server busy: {self.in_flight} requests in flight "
                f"(--max-inflight-requests {limit}{of_group})",
                request_id,
            )
        downstream = self.stages[GENERATES].capacity
        if downstream is not None and self.in_flight >= share(downstream):
            return busy(
                f"server busy: every decode instance is full ({self.in_flight} requests in flight)",
                request_id,
            )
        return None

    async def _answer(
        self,
        request: Request,
        request_id: str,
        telemetry: RequestTelemetry,
        make_plan: Callable[[bytes, str], Awaitable[_Plan]],
    ) -> Response:
        choices: Choices | None = None
        plan: _Plan | None = None
        try:
            try:
                plan = await make_plan(request.read(), request_id)
                telemetry.prompts(plan.prompts)
                request.exchange.prompt_tokens = sum(len(p.token_ids) for p in plan.prompts)
                entry = self.entry_for(plan.requests)
                choices = Choices(
                    self.runtime,
                    entry,
                    plan.requests,
                    request_id,
                    telemetry,
                    deadline=time.time() + self.config.request_timeout_s,
                    migration_limit=self.config.migration_limit,
                    affinity=[self._affinity(r, entry) for r in plan.requests],
                )
                # Nothing reaches the client before every choice's first chunk: until then a
                # failure is still a plain HTTP error (a 503 with Retry-After when the cause
                # is load), and a lost instance costs only a migration.
                await choices.start()
            except Exception as error:
                return self._failure(error, request_id)
            fields = plan.fields
            outputs = [Output(self.preprocessor.tokenizer, r.sampling.stop) for r in plan.requests]
            reply = plan.reply(
                request_id,
                fields.model,
                choices=choices,
                outputs=outputs,
                prompt_tokens=request.exchange.prompt_tokens or 0,
                token_text=self.token_text,
                exchange=request.exchange,
                stream=bool(fields.stream),
                include_usage=fields.include_usage,
                return_token_ids=bool(fields.return_token_ids),
                logprobs=plan.logprobs,
            )
            return await reply.send(request)
        finally:
            if choices is not None:
                await choices.close()
            if plan is not None:
                image_bytes.release(self.agent, plan.exported)

    def _failure(self, error: Exception, request_id: str) -> Response:
        """The HTTP answer for a request that failed before anything was sent."""
        if isinstance(error, BodyTooLarge):
            info = ErrorInfo(
                code=ErrorCode.PAYLOAD_TOO_LARGE,
                message=f"request body is over {self.config.max_body_bytes} bytes",
            )
        elif isinstance(error, ValidationError):
            message, param = describe(error)
            info = ErrorInfo(code=ErrorCode.BAD_REQUEST, message=message, param=param)
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

    def _accept(self, fields: SamplingFields) -> None:
        """Check the model name; log each unknown field name once."""
        for name in fields.model_extra or {}:
            if name not in self._unknown_fields and len(self._unknown_fields) < _MAX_UNKNOWN_NAMES:
                self._unknown_fields.add(name)
                log.warning(
                    "requests carry the field '%s', unknown here: ignored (said once)", name
                )
        if fields.model != self.config.served_model_name:
            raise self._unknown_model(fields.model)

    async def _check_format(self, fields: SamplingFields) -> None:
        """A ``response_format`` schema the grammar library cannot take is a 400 here, before
        any worker is touched. Compiling is the decode worker's; checking costs little but
        still runs off the event loop."""
        wanted = resolve_format(fields.response_format)
        if wanted is not None:
            await asyncio.to_thread(grammar.check, wanted)

    @property
    def context_length(self) -> int:
        """Tokens a request may hold, prompt included: what the decode workers announce, the
        model's own context until one does."""
        return self.stages[GENERATES].context_length or self.preprocessor.context_length

    def _max_tokens(self, prompt: Prompt, wanted: int | None, param: str) -> int:
        """`wanted` (or what the context leaves), once it fits beside the prompt."""
        context = self.context_length
        left = context - len(prompt.token_ids)
        if left < 1:  # the prompt alone: what a worker would answer
            raise over_context(len(prompt.token_ids), context)
        if wanted is not None and wanted > left:
            raise over_context(len(prompt.token_ids), context, wanted, param=param)
        capped = self.preprocessor.sampling_defaults.max_tokens
        return wanted or min(left, capped or left)

    def _requests(
        self, fields: SamplingFields, prompt: Prompt, max_tokens: int, logprobs: int | None
    ) -> list[GenerateRequest]:
        """One pipeline request per choice of `prompt`."""
        return [
            GenerateRequest(
                model=fields.model,
                token_ids=prompt.token_ids,
                images=prompt.images,
                videos=prompt.videos,
                sampling=fields.sampling(
                    max_tokens,
                    self.preprocessor.sampling_defaults,
                    logprobs=logprobs,
                    choice=choice,
                ),
                eos_token_ids=self.preprocessor.eos_token_ids,
            )
            for choice in range(fields.choices)
        ]

    async def _chat_plan(self, body: bytes, request_id: str) -> _Plan:
        chat = ChatCompletionRequest.model_validate_json(body)
        self._accept(chat)
        await self._check_format(chat)
        prompt = await self.preprocessor.prompt(chat)
        param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        max_tokens = self._max_tokens(prompt, chat.requested_max_tokens, param)
        # Images and videos too large for a NATS message wait in this process's pool, one export
        # for every choice (each choice's encoder reads it), until the request ends.
        items: list[MediaItem] = [*prompt.images, *prompt.videos]
        media = await image_bytes.offload(
            self.agent,
            items,
            f"img-{request_id}",
            self.config.inline_image_bytes,
        )
        sent = Prompt(
            token_ids=prompt.token_ids,
            images=[item for item in media if isinstance(item, ImageItem)],
            videos=[item for item in media if isinstance(item, VideoItem)],
        )
        requests = self._requests(chat, sent, max_tokens, chat.top_logprobs_count)
        exported = [item for item in media if item.data_handle is not None]
        logprobs = chat.top_logprobs_count is not None
        return _Plan(chat, [prompt], requests, ChatReply, logprobs, exported)

    async def _completion_plan(self, body: bytes, request_id: str) -> _Plan:
        completion = CompletionRequest.model_validate_json(body)
        self._accept(completion)
        await self._check_format(completion)
        vocabulary = len(self.preprocessor.tokenizer)
        prompts: list[Prompt] = []
        requests: list[GenerateRequest] = []
        for index, given in enumerate(completion.prompts):
            ids = self.preprocessor.encode_text(given) if isinstance(given, str) else given
            if not ids or max(ids) >= vocabulary:
                raise ServiceError(
                    ErrorCode.BAD_REQUEST,
                    f"prompt {index} is empty or holds token ids beyond the vocabulary "
                    f"({vocabulary} tokens)",
                    param="prompt",
                )
            prompt = Prompt(token_ids=ids, images=[])
            max_tokens = self._max_tokens(prompt, completion.max_tokens, "max_tokens")
            prompts.append(prompt)
            requests.extend(self._requests(completion, prompt, max_tokens, completion.logprobs))
        return _Plan(
            completion, prompts, requests, CompletionReply, completion.logprobs is not None
        )
