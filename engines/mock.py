"""The mock engine: real control flow, simulated compute, deterministic tokens.

It runs anywhere, which makes it the engine for load tests and for scale tests of the
runtime. Every role behaves like a real engine: encode returns as many embedding rows as the
images' token counts, prefill opens a real bootstrap room and decode joins it, cancellation
frees rooms, and each stage takes time like a 7B-class model on one GPU by default (tokens
stream one at a time); zero costs make it as fast as the machinery around it.

Tokens are a pure function of the prompt tokens and the seed, so every topology returns the
same tokens for the same request, and they come from the model's ordinary vocabulary: each is
drawn uniformly from ``[vocab_low, vocab_high)``, so its log-probability is
``-log(vocab_high - vocab_low)``, as is that of every alternative.
"""

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from triptych.engines.base import (
    AggregatedEngine,
    DecodeEngine,
    EncodeEngine,
)
from triptych.engines.load import METER
from triptych.engines.rooms import RoomPrefillEngine
from triptych.observability import metrics
from triptych.protocol import (
    BootstrapInfo,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    ImageItem,
    RoomReady,
    ServiceError,
    TokenChunk,
    TokenLogprob,
    VideoItem,
)
from triptych.protocol.settings import setting
from triptych.transfer import BootstrapClient, ImageEmbeddings


@dataclass(frozen=True)
class MockConfig:
    """Simulated costs (a 7B-class model on one GPU by default) and the token range."""

    encode_s_per_image: float = setting(
        0.02, "mock engine: seconds to encode one image", "--mock-encode-s-per-image"
    )
    prefill_s_per_token: float = setting(
        0.0001, "mock engine: seconds to prefill one prompt token", "--mock-prefill-s-per-token"
    )
    decode_s_per_step: float = setting(
        0.015,
        "mock engine: seconds per decode step (0: every token at once, one chunk)",
        "--mock-decode-s-per-step",
    )
    """Steps shorter than `MIN_WAIT_S` add up and are waited for together; each token still
    comes in its own chunk."""
    vocab_low: int = 256
    """Smallest token id produced."""
    vocab_high: int = 1024
    """One past the largest token id produced."""
    hidden_size: int = 64
    """Width of the simulated embeddings."""
    room_done_timeout_s: float = 60.0
    """How long prefill keeps a room's (simulated) cache for decode to fetch."""
    fail_prefill: bool = False
    """Fault injection: every prefill fails after its room was handed out."""
    max_running: int = 32
    """Requests a decoding engine runs at once; more wait for admission, as on a real one."""


_LCG_MULTIPLIER = 6364136223846793005
_LCG_INCREMENT = 1442695040888963407
_MASK_64 = (1 << 64) - 1


def mock_tokens(request: GenerateRequest, low: int, high: int) -> list[int]:
    """The tokens the mock engine generates for `request` (before stop conditions): a function
    of its prompt and seed alone, the same in every process.

    Drawn from a 64-bit linear congruential generator (Knuth's MMIX constants) seeded with
    the hash of the prompt's ids and the seed (-1 for none; seeds are not negative): integers
    hash alike in every process, and this costs decode under half of what hashing the
    prompt's text and seeding a Mersenne twister did, per request."""
    seed = request.sampling.seed
    state = hash((*request.token_ids, -1 if seed is None else seed)) & _MASK_64
    width = high - low
    shift = 64 - width.bit_length()
    tokens: list[int] = []
    while len(tokens) < request.sampling.max_tokens:
        state = (state * _LCG_MULTIPLIER + _LCG_INCREMENT) & _MASK_64
        offset = state >> shift  # the top bits, uniform below 2**bits; past the range: again
        if offset < width:
            tokens.append(low + offset)
    return tokens


def mock_logprobs(token: int, top: int, low: int, high: int) -> TokenLogprob:
    """The log-probability of a drawn `token` and of `top` alternatives: the uniform draw gives
    each the same, so the drawn token comes first, then the ids after it."""
    width = high - low
    logprob = -math.log(width)
    ids = [low + (token - low + i) % width for i in range(min(top, width))]
    return TokenLogprob(logprob=logprob, top=[(i, logprob) for i in ids])


MIN_WAIT_S = 0.001
"""The shortest simulated wait worth a timer (uvloop's timers count whole milliseconds)."""


class _Steps:
    """The simulated time of one sequence's decode steps: each step yields to the event loop
    (its token leaves on its own), and the steps' time is waited for once it adds up to
    `MIN_WAIT_S` or more. A step of a microsecond thus costs no timer, and a sequence ends
    less than `MIN_WAIT_S` before its steps' total."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._owed = 0.0

    async def take(self) -> None:
        """One decode step (none at all without a cost)."""
        if self._seconds <= 0:
            return
        self._owed += self._seconds
        if self._owed < MIN_WAIT_S:
            await asyncio.sleep(0)
            return
        owed, self._owed = self._owed, 0.0
        await asyncio.sleep(owed)


class _Admission(contextlib.AbstractAsyncContextManager[None]):
    """At most `max_running` holders at a time; the rest wait in arrival order, counted in
    the stage's queue signal. One context manager for every holder (it keeps no state of
    theirs), so a request's admission builds nothing."""

    def __init__(self, max_running: int) -> None:
        self._running = asyncio.Semaphore(max(1, max_running))
        self.waiting = 0
        METER.add_queue(lambda: self.waiting)

    def admit(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a place while inside."""
        return self

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._running.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        self._running.release()


class _ModelThread:
    """The simulated device: one piece of encode or prefill work at a time, as on a real
    engine's model thread, so that load queues and shows in the stage's signals."""

    def __init__(self) -> None:
        self._turn = _Admission(1)

    async def run(self, kind: str, seconds: float) -> None:
        if seconds <= 0:
            return
        async with self._turn.admit():
            with METER.busy(kind):
                await asyncio.sleep(seconds)


class _DecodeBatch:
    """Sequences decoding together: the simulated model thread is busy while any runs, and
    the tokens they emit in one event-loop turn are counted together, as one step of a real
    engine's batch."""

    def __init__(self) -> None:
        self.running = 0
        self._busy = 0
        self._emitted = 0

    def emitted(self, tokens: int) -> None:
        """Count `tokens` with the rest of this turn's."""
        if not self._emitted:
            asyncio.get_running_loop().call_soon(self._count)
        self._emitted += tokens

    def _count(self) -> None:
        METER.count("output_tokens", self._emitted)
        self._emitted = 0

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        self.running += 1
        if self.running == 1:
            self._busy = METER.begin("decode")
        try:
            yield
        finally:
            self.running -= 1
            if self.running == 0:
                METER.end(self._busy)


class _Generator:
    """Emits tokens with the stop rules real engines apply (EOS, stop ids, min/max tokens)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._batch = _DecodeBatch()

    async def stream(
        self, request: GenerateRequest, ready: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[TokenChunk]:
        """The tokens of `request` once `ready()` has run (the prompt's prefill, or the
        arrival of its KV cache): one generator from the first step to the last token, as
        every level of async iteration costs each token a hop."""
        await ready()
        sampling = request.sampling
        if sampling.response_format is not None:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                f"response_format {sampling.response_format.type} is not supported by the mock "
                "engine, whose tokens are random; serve with --engine hf or sglang",
                param="response_format",
            )
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops.update(request.eos_token_ids)
        tokens = mock_tokens(request, self.config.vocab_low, self.config.vocab_high)
        step = self.config.decode_s_per_step
        steps = _Steps(step)
        low, high = self.config.vocab_low, self.config.vocab_high
        pending: list[int] = []
        with self._batch.joined():
            for index, token in enumerate(tokens):
                pending.append(token)
                finished = token in stops and index + 1 > sampling.min_tokens
                last = finished or index + 1 == sampling.max_tokens
                if step > 0 or last:  # with no decode cost every token is ready at once
                    await steps.take()
                    reason: FinishReason | None = (
                        ("stop" if finished else "length") if last else None
                    )
                    logprobs: list[TokenLogprob] | None = None
                    if sampling.logprobs is not None:
                        logprobs = [mock_logprobs(t, sampling.logprobs, low, high) for t in pending]
                    self._batch.emitted(len(pending))
                    yield TokenChunk(token_ids=pending, finish_reason=reason, logprobs=logprobs)
                    pending = []
                if last:
                    return


class MockEncodeEngine(EncodeEngine):
    """Encode: as many (zero) embedding rows as the images' and videos' token counts, after
    a delay (a video costs one image per temporal patch)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._model = _ModelThread()

    async def encode(
        self, request_id: str, images: Sequence[ImageItem], videos: Sequence[VideoItem] = ()
    ) -> ImageEmbeddings:
        pictures = len(images) + sum(video.grid_thw[0] for video in videos)
        metrics.ENCODE_BATCH.observe(len(images) + len(videos))
        await self._model.run("encode", self.config.encode_s_per_image * pictures)
        METER.count("images", pictures)
        return ImageEmbeddings(
            num_tokens=sum(i.num_tokens for i in images) + sum(v.num_tokens for v in videos),
            hidden_size=self.config.hidden_size,
        )


class MockPrefillEngine(RoomPrefillEngine):
    """Prefill: a real bootstrap room, a simulated cache."""

    def __init__(
        self,
        config: MockConfig,
        bootstrap_host: str = "127.0.0.1",
        bootstrap_port: int = 0,
        advertise_host: str | None = None,
    ) -> None:
        super().__init__(bootstrap_host, bootstrap_port, advertise_host)
        self.config = config
        self._model = _ModelThread()

    async def prefill(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> None:
        async with self.filling(request) as opened:
            _check_embeddings(request, embeddings)
            cost = self.config.prefill_s_per_token * len(request.token_ids)
            await self._model.run("prefill", cost)
            METER.count("prompt_tokens", len(request.token_ids))
            if self.config.fail_prefill:
                raise ServiceError(ErrorCode.INTERNAL, "injected prefill failure")
            opened.ready(RoomReady(room=opened.room))
            await opened.wait_done(self.config.room_done_timeout_s)


class MockDecodeEngine(DecodeEngine):
    """Decode: joins the room, waits for prefill, then generates."""

    def __init__(self, config: MockConfig) -> None:
        self._tokens = _Generator(config)
        self._rooms = BootstrapClient()
        self._admission = _Admission(config.max_running)

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        return self._admission.admit()

    async def close(self) -> None:
        await self._rooms.close()

    def generate(
        self, request_id: str, request: GenerateRequest, bootstrap: BootstrapInfo
    ) -> AsyncIterator[TokenChunk]:
        return self._tokens.stream(request, lambda: self._receive(bootstrap))

    async def _receive(self, bootstrap: BootstrapInfo) -> None:
        """Join the room and take the (simulated) KV cache once prefill has made it."""
        host, port = bootstrap.bootstrap_host, bootstrap.bootstrap_port
        await self._rooms.join(host, port, bootstrap.bootstrap_room)
        await self._rooms.done(host, port, bootstrap.bootstrap_room)


class MockAggregatedEngine(AggregatedEngine):
    """Prefill and decode in one: no room."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._tokens = _Generator(config)
        self._admission = _Admission(config.max_running)

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        return self._admission.admit()

    def generate(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> AsyncIterator[TokenChunk]:
        return self._tokens.stream(request, lambda: self._prefill(request, embeddings))

    async def _prefill(self, request: GenerateRequest, embeddings: ImageEmbeddings | None) -> None:
        _check_embeddings(request, embeddings)
        cost = self.config.prefill_s_per_token * len(request.token_ids)
        if cost > 0:
            with METER.busy("prefill"):
                await asyncio.sleep(cost)
        METER.count("prompt_tokens", len(request.token_ids))


def _check_embeddings(request: GenerateRequest, embeddings: ImageEmbeddings | None) -> None:
    expected = request.media_tokens
    rows = embeddings.num_tokens if embeddings is not None else 0
    if rows != expected:
        raise ServiceError(
            ErrorCode.INTERNAL, f"embedding rows ({rows}) do not match image tokens ({expected})"
        )
