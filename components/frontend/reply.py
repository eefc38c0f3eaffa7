"""Writing a request's choices back to the client: server-sent events as tokens arrive, or one
JSON object at the end. The chat and completions shapes differ only in their objects
(`ChatReply`, `CompletionReply`); the flow is this one.
"""

import abc
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field

from pydantic import BaseModel
from pydantic_core import to_json

from triptych.components.frontend.choices import Choices
from triptych.components.frontend.http import Exchange, Request, Response, Stream
from triptych.components.frontend.logprobs import TokenText
from triptych.components.frontend.middleware import error_response
from triptych.components.frontend.output import Output
from triptych.protocol import ErrorCode, ErrorResponse, ServiceError, TokenChunk, Usage
from triptych.protocol.openai import ErrorBody, PromptTokensDetails

log = logging.getLogger(__name__)

SSE = "text/event-stream"


_TEXT = "\x00triptych-text\x00"
"""Stands for the text in an event serialized once per choice, to be cut out of it."""


def sse(payload: BaseModel) -> bytes:
    """One server-sent event."""
    return (
        b"data: " + payload.__pydantic_serializer__.to_json(payload, exclude_none=False) + b"\n\n"
    )


@dataclass(eq=False)
class Reply(abc.ABC):
    """One request's answer, built from its choices' chunks."""

    request_id: str
    model: str
    _: KW_ONLY
    choices: Choices
    outputs: Sequence[Output]
    prompt_tokens: int
    token_text: TokenText
    exchange: Exchange
    stream: bool
    include_usage: bool
    return_token_ids: bool
    logprobs: bool
    _unwritten: list[bytes] = field(init=False, default_factory=list)
    """Events of chunks that arrived together, written as one (one syscall, not one per
    token) once no further chunk is waiting."""
    _created: int = field(init=False, default_factory=lambda: int(time.time()))
    _plain: bool = field(init=False)
    """Mid-stream events carry text alone: each is its choice's frame around the text."""
    _frames: dict[int, tuple[bytes, bytes]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._plain = not (self.return_token_ids or self.logprobs)

    def usage(self) -> Usage:
        """Token counts so far (the prompts once, every choice's completion)."""
        completion = sum(output.completion_tokens for output in self.outputs)
        self.exchange.completion_tokens = completion
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.choices.cached_tokens),
        )

    @abc.abstractmethod
    def opening(self) -> list[BaseModel]:
        """Events sent before any token (the chat's role deltas)."""

    @abc.abstractmethod
    def delta(self, index: int, text: str, chunk: TokenChunk) -> BaseModel | None:
        """The event for a chunk of choice `index` that showed `text` (None: nothing to say)."""

    @abc.abstractmethod
    def text_event(self, index: int, text: str) -> BaseModel:
        """The event of a chunk of choice `index` that carries `text` and nothing else (the
        stream goes on, no token ids, no logprobs): what `delta` says then."""

    def _text_sse(self, index: int, text: str) -> bytes:
        """`sse(self.text_event(index, text))`, without building and serializing the models
        for every token: the event is serialized once per choice and the text set into it."""
        frame = self._frames.get(index)
        if frame is None:
            head, _, tail = sse(self.text_event(index, _TEXT)).partition(to_json(_TEXT))
            frame = self._frames[index] = head, tail
        return frame[0] + to_json(text) + frame[1]

    @abc.abstractmethod
    def final_usage(self) -> BaseModel:
        """The stream's last event, with the usage (``stream_options.include_usage``)."""

    @abc.abstractmethod
    def whole(self) -> BaseModel:
        """The non-streamed response."""

    async def send(self, request: Request) -> Response:
        """Stream or collect, as the request asked."""
        if self.stream:
            return await self._stream(request)
        error = await self._consume(None)
        if error is not None:
            return error_response(error.info.model_copy(update={"request_id": self.request_id}))
        body = self.whole().model_dump_json().encode()
        return Response(body=body, headers={"X-Request-Id": self.request_id})

    async def _stream(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Request-Id": self.request_id}
        stream = request.stream(SSE, headers)
        self._unwritten.extend(sse(event) for event in self.opening())
        error = await self._consume(stream)
        if error is not None:
            info = error.info.model_copy(update={"request_id": self.request_id})
            body = ErrorBody(message=info.message, type=info.openai_type, code=info.code)
            self._unwritten.append(sse(ErrorResponse(error=body)))
        elif self.include_usage:
            self._unwritten.append(sse(self.final_usage()))
        else:
            self.usage()  # for the access log
        self._unwritten.append(b"data: [DONE]\n\n")
        return await stream.close(b"".join(self._unwritten))  # with the last chunk: one write

    async def _consume(self, response: Stream | None) -> ServiceError | None:
        """Feed every chunk to its choice's output (writing events when streaming) until all
        choices finished; a failure after the first chunk is returned."""
        remaining = len(self.outputs)
        try:
            async with contextlib.aclosing(self.choices.events()) as events:
                async for index, chunk in events:
                    output = self.outputs[index]
                    text = output.add(chunk)
                    if response is not None:
                        if self._plain and text and not output.finished:
                            self._unwritten.append(self._text_sse(index, text))
                        elif (event := self.delta(index, text, chunk)) is not None:
                            self._unwritten.append(sse(event))
                        if self._unwritten and not self.choices.pending():
                            await response.write(b"".join(self._unwritten))
                            self._unwritten.clear()
                    if output.finished:
                        remaining -= 1
                        if chunk.finish_reason is None:  # a stop string ended it early
                            await self.choices.finish(index)
                        if not remaining:
                            break
        except ServiceError as error:
            return error
        except ConnectionError:  # the client went away: nothing to tell it
            raise
        except Exception as error:  # a bug of ours: the client gets a clean 500, we the details
            log.exception("request %s failed while streaming", self.request_id)
            return ServiceError(ErrorCode.INTERNAL, f"internal error ({type(error).__name__})")
        self.usage()
        return None
