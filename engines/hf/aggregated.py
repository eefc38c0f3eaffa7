"""The ``hf`` aggregated engine: prefill and decode in one process, no KV transfer."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from triptych.engines.base import AggregatedEngine, Runner
from triptych.engines.hf.executor import PREFILL_BATCH, Decoding, ModelExecutor, load_executor
from triptych.engines.hf.streaming import decode_stream
from triptych.models.mrope import media_grids
from triptych.observability import metrics
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError, TokenChunk
from triptych.transfer import ImageEmbeddings


class HfAggregatedEngine(AggregatedEngine):
    """Prefills each request on the model thread, then decodes it in the shared batch.

    The worker holds `admit` (a KV slot) around `generate`.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        decoding: Decoding | None = None,
        prefill_batch: int = PREFILL_BATCH,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.decoding = decoding or Decoding()
        self.prefill_batch = prefill_batch
        self.executor: ModelExecutor | None = None

    async def start(self) -> None:
        if self.executor is None:
            self.executor = await load_executor(
                self.model_path, self.device, self.decoding, "agg", self.prefill_batch
            )

    def model_runner(self) -> Runner | None:
        return self.executor.runner() if self.executor is not None else None

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        assert self.executor is not None, "start() first"
        return self.executor.reservation(len(request.token_ids))

    async def close(self) -> None:
        if self.executor is not None:
            await asyncio.to_thread(self.executor.close)

    async def generate(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> AsyncIterator[TokenChunk]:
        assert self.executor is not None, "start() first"
        grids = media_grids(request)
        tensor = embeddings.tensor if embeddings is not None else None
        if request.media and tensor is None:
            raise ServiceError(ErrorCode.INTERNAL, "images arrived without embeddings")
        kv, hidden = await self.executor.prefill((request.token_ids, grids, tensor))
        metrics.TOKENS_PROCESSED.labels("agg", "prefill").inc(len(request.token_ids))
        async for chunk in decode_stream(self.executor, request_id, request, kv, hidden):
            yield chunk
