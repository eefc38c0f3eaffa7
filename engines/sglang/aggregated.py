"""The ``sglang`` aggregated engine: one ``sglang.Engine`` without disaggregation (E/PD, EPD)
prefills and decodes from the precomputed embeddings."""

from collections.abc import AsyncIterator

from triptych.engines.base import AggregatedEngine
from triptych.engines.registry import EngineConfig
from triptych.engines.sglang.language import LanguageEngine
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError, TokenChunk
from triptych.transfer import ImageEmbeddings


class SglangAggregatedEngine(AggregatedEngine):
    """Prefill and decode in one SGLang engine; SGLang queues what does not fit yet."""

    def __init__(self, config: EngineConfig) -> None:
        self.language = LanguageEngine(config, "agg")

    async def start(self) -> None:
        self.language.start()

    async def close(self) -> None:
        self.language.close()

    def context_length(self) -> int | None:
        return self.language.context_length

    async def generate(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> AsyncIterator[TokenChunk]:
        if request.images and (embeddings is None or embeddings.tensor is None):
            raise ServiceError(ErrorCode.INTERNAL, "images arrived without embeddings")
        async for chunk in self.language.stream(request_id, request, embeddings):
            yield chunk
