"""The decode worker's request handlers: disaggregated and aggregated."""

from collections.abc import AsyncIterator

from triptych.engines import AggregatedEngine, DecodeEngine, EncodeEngine
from triptych.engines.inputs import gather_embeddings
from triptych.models.prefix import route_keys
from triptych.observability import nvtx
from triptych.protocol import BootstrapInfo, GenerateRequest, TokenChunk
from triptych.runtime import Client, Context
from triptych.transfer import EmbeddingTransport


async def _stream(chunks: AsyncIterator[TokenChunk], ctx: Context, ttft: nvtx.Mark) -> None:
    """Send chunks as they come; the time-to-first-token ranges end at the first one."""
    with nvtx.start("mm:dec:first_token") as first_token:
        async for chunk in chunks:
            first_token.end()
            ttft.end()
            await ctx.stream.send(chunk, end=chunk.finish_reason is not None)


class DisaggregatedHandler:
    """Asks a prefill instance for a bootstrap room, then decodes from the KV it hands over.

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
                answer = await self.prefill.call(
                    request,
                    request_id=ctx.request_id,
                    deadline=ctx.deadline,
                    affinity=route_keys(request) if self.prefix_affinity else (),
                )
                try:
                    bootstrap = await answer.next_model(BootstrapInfo)
                finally:
                    answer.close()
                chunks = self.engine.generate(ctx.request_id, request, bootstrap)
                await _stream(chunks, ctx, ttft)


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
                await _stream(chunks, ctx, ttft)
