"""The ``hf`` aggregated engine: prefill and decode in one process, no KV transfer."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from triptych.engines.base import AggregatedEngine, Runner
from triptych.engines.hf.admissions import Admissions, stop_ids
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore, load_core
from triptych.engines.hf.sequence import Prompt
from triptych.models.mrope import media_grids
from triptych.models.prefix import request_block_keys
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError, TokenChunk
from triptych.transfer import ImageEmbeddings


class HfAggregatedEngine(AggregatedEngine):
    """Prefills each request on the model thread (in chunks, between decode steps), then
    decodes it in the shared batch. The worker holds `admit` (KV blocks for the prompt, the
    cached blocks of its prefix shared) around `generate`."""

    def __init__(
        self, model_path: str, device: str = "cpu", config: HfConfig | None = None
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.config = config or HfConfig()
        self.core: EngineCore | None = None
        self.admissions = Admissions()

    async def start(self) -> None:
        if self.core is None:
            self.core = await load_core(self.model_path, self.device, self.config, True, "agg")

    def model_runner(self) -> Runner | None:
        return self.core.on_model_thread() if self.core is not None else None

    def context_length(self) -> int | None:
        return self.core.max_len if self.core is not None else None

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        assert self.core is not None, "start() first"
        keys = None
        if self.config.prefix_cache:
            keys = request_block_keys(request, self.config.page_size)
        return self.admissions.hold(self.core, request, keys)

    async def close(self) -> None:
        if self.core is not None:
            await asyncio.to_thread(self.core.close)

    async def generate(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> AsyncIterator[TokenChunk]:
        assert self.core is not None, "start() first"
        sequence = self.admissions.take(request)
        sequence.request_id = request_id
        tensor = embeddings.tensor if embeddings is not None else None
        if request.media and tensor is None:
            raise ServiceError(ErrorCode.INTERNAL, "images arrived without embeddings")
        prompt = Prompt(request.token_ids, media_grids(request), tensor)
        async for chunk in self.core.generate(
            sequence, request.sampling, stop_ids(request), prompt
        ):
            yield chunk
