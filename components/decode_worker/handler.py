"""The decode worker's request handlers: disaggregated and aggregated."""

from collections.abc import AsyncIterator

from triptych.engines import AggregatedEngine, DecodeEngine, EncodeEngine
from triptych.engines.inputs import gather_embeddings
from triptych.protocol import BootstrapInfo, GenerateRequest, TokenChunk
from triptych.runtime import Client, Context
from triptych.transfer import EmbeddingTransport


async def _stream(chunks: AsyncIterator[TokenChunk], ctx: Context) -> None:
    async for chunk in chunks:
        await ctx.stream.send(chunk, end=chunk.finish_reason is not None)


class DisaggregatedHandler:
    """Asks a prefill instance for a bootstrap room, then decodes from the KV it hands over."""

    def __init__(self, engine: DecodeEngine, prefill: Client) -> None:
        self.engine = engine
        self.prefill = prefill

    async def generate(self, request: GenerateRequest, ctx: Context) -> None:
        """Bootstrap with prefill (same request id: a cancel reaches both), then stream tokens."""
        answer = await self.prefill.call(request, request_id=ctx.request_id, deadline=ctx.deadline)
        try:
            bootstrap = await answer.next_model(BootstrapInfo)
        finally:
            answer.close()
        await _stream(self.engine.generate(ctx.request_id, request, bootstrap), ctx)


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
        embeddings = await gather_embeddings(request, ctx.request_id, self.transport, self.encoder)
        await _stream(self.engine.generate(ctx.request_id, request, embeddings), ctx)
