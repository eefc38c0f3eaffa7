"""The decode worker's request handlers: disaggregated and aggregated."""

import asyncio
from collections.abc import AsyncIterator, Sequence

from triptych.engines import AggregatedEngine, DecodeEngine, EncodeEngine
from triptych.engines.inputs import gather_embeddings
from triptych.models.prefix import route_keys
from triptych.observability import nvtx
from triptych.protocol import (
    BootstrapInfo,
    ErrorCode,
    GenerateRequest,
    ServiceError,
    TokenChunk,
    encode_chunk,
)
from triptych.runtime import Client, Context
from triptych.transfer import EmbeddingTransport
from triptych.transfer.bootstrap import new_room


async def _stream(started: "_Started", ctx: Context, ttft: nvtx.Mark) -> None:
    """Send chunks as they come; the time-to-first-token ranges end at the first one."""
    with nvtx.start("mm:dec:first_token") as first_token:
        chunk = await started.first()
        first_token.end()
        ttft.end()
    send = ctx.stream.send_bytes
    if chunk is not None:
        await send(encode_chunk(chunk), end=chunk.finish_reason is not None)
        async for chunk in started.chunks:
            await send(encode_chunk(chunk), end=chunk.finish_reason is not None)


class DisaggregatedHandler:
    """Picks a prefill instance and a room, joins the room and sends prefill the request at
    the same time, then decodes from the KV cache it hands over.

    Prefill announces its bootstrap address in its discovery metadata, so decode needs no
    round trip to learn the room: its join waits at prefill's endpoint while the request is
    on its way there. A prefill instance that announces nothing is asked for a room.

    With `prefix_affinity`, the prefill instance is picked by rendezvous hashing of the
    prompt's beginning (`models.prefix.route_keys`), so prompts that share it meet the
    instance whose prefix cache holds it (the next one in hash order when that one is loaded
    or gone).
    """

    def __init__(self, engine: DecodeEngine, prefill: Client, prefix_affinity: bool = True):
        self.engine = engine
        self.prefill = prefill
        self.prefix_affinity = prefix_affinity

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Once admitted, bootstrap with prefill (one request id: a cancel reaches both); stream."""
        with (
            nvtx.span("mm:pd:generate"),
            nvtx.span("mm:pd:generate_disagg"),
            nvtx.start("mm:pd:ttft") as ttft,
        ):
            async with self.engine.admit(request):
                started = await self._bootstrap(request, ctx)
                try:
                    await _stream(started, ctx, ttft)
                finally:
                    await started.aclose()

    async def _bootstrap(self, request: GenerateRequest, ctx: Context) -> "_Started":
        refused: ServiceError | None = None
        affinity = route_keys(request) if self.prefix_affinity and self.prefill.has_choice else []
        for instance in await self.prefill.candidates(ctx.deadline, affinity):
            room = new_room()
            bootstrap = _announced(self.prefill.instances.metadata(instance), room)
            if bootstrap is None:
                return _Started.later(await self._ask_for_room(request, ctx, instance))
            started = _Started.now(self.engine.generate(ctx.request_id, request, bootstrap))
            try:  # prefill reports into the room: its acceptance is the call's only answer
                await self.prefill.send(
                    request.model_copy(update={"bootstrap_room": room}),
                    request_id=ctx.request_id,
                    deadline=ctx.deadline,
                    instance=instance,
                )
            except BaseException as error:
                await started.aclose()
                if not isinstance(error, ServiceError) or error.code != ErrorCode.UNAVAILABLE:
                    raise
                refused = error  # gone, draining or busy: the next instance may take it
                continue
            return started
        if refused is not None:
            raise refused
        return _Started.later(await self._ask_for_room(request, ctx, None, affinity))

    async def _ask_for_room(
        self,
        request: GenerateRequest,
        ctx: Context,
        instance: str | None,
        affinity: Sequence[str] = (),
    ) -> AsyncIterator[TokenChunk]:
        answer = await self.prefill.call(
            request,
            request_id=ctx.request_id,
            deadline=ctx.deadline,
            instance=instance,
            affinity=affinity,
        )
        try:
            bootstrap = await answer.next_model(BootstrapInfo)
        finally:
            answer.close()
        return self.engine.generate(ctx.request_id, request, bootstrap)


def _announced(metadata: dict[str, str], room: int) -> BootstrapInfo | None:
    """`room` at the bootstrap address a prefill instance announces (None: it announces none)."""
    host, port = metadata.get("bootstrap_host"), metadata.get("bootstrap_port", "")
    outcome = metadata.get("outcome_port", "")
    if not host or not port.isdigit():
        return None
    return BootstrapInfo(
        bootstrap_host=host,
        bootstrap_port=int(port),
        bootstrap_room=room,
        outcome_port=int(outcome) if outcome.isdigit() else None,
    )


class _Started:
    """A decode stream whose first step (joining the room) may already be running; after the
    first chunk, `chunks` is iterated directly."""

    def __init__(
        self, chunks: AsyncIterator[TokenChunk], first: "asyncio.Future[TokenChunk | None] | None"
    ) -> None:
        self.chunks = chunks
        self._first = first

    @classmethod
    def now(cls, chunks: AsyncIterator[TokenChunk]) -> "_Started":
        """Start the first step at once (the join goes out while prefill is being called)."""
        return cls(chunks, asyncio.ensure_future(anext(chunks, None)))

    @classmethod
    def later(cls, chunks: AsyncIterator[TokenChunk]) -> "_Started":
        return cls(chunks, None)

    async def first(self) -> TokenChunk | None:
        """The first chunk (None: the stream ended without one)."""
        first, self._first = self._first, None
        if first is not None:
            return await first
        return await anext(self.chunks, None)

    async def aclose(self) -> None:
        """Stop the first step if it still runs, and close the stream."""
        first, self._first = self._first, None
        if first is not None:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class AggregatedHandler:
    """Prefill and decode in this process; images are encoded here unless already encoded."""

    def __init__(
        self, engine: AggregatedEngine, transport: EmbeddingTransport, encoder: EncodeEngine | None
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.encoder = encoder

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Gather the embeddings, then stream tokens."""
        with (
            nvtx.span("mm:pd:generate"),
            nvtx.span("mm:pd:generate_agg"),
            nvtx.start("mm:pd:ttft") as ttft,
        ):
            async with self.engine.admit(request):
                with nvtx.span("mm:pd:load_multimodal"):
                    embeddings = await gather_embeddings(
                        request, ctx.request_id, self.transport, self.encoder
                    )
                chunks = self.engine.generate(ctx.request_id, request, embeddings)
                await _stream(_Started.later(chunks), ctx, ttft)
