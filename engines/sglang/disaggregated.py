"""The ``sglang`` prefill and decode engines: SGLang's own PD disaggregation over NIXL.

Prefill runs ``sglang.Engine(disaggregation_mode="prefill")``, whose bootstrap server runs
inside it; decode runs one with ``disaggregation_mode="decode"``. The room triptych hands
decode carries SGLang's ``{bootstrap_host, bootstrap_port, bootstrap_room}`` (the caller
allocates the 63-bit room, as SGLang expects), and both engines get the same request,
image item included: SGLang's decode needs the grids for Qwen's M-RoPE positions.

SGLang alone would leave a decode waiting up to its 300 s bootstrap timeout when prefill
fails before its engine ever saw the request (the embeddings could not be read). So prefill
also keeps a triptych room (`outcome_port`) and reports there; decode watches it and aborts
its SGLang request the moment prefill fails. Cancelling either side aborts its SGLang request.
"""

import asyncio
from collections.abc import AsyncIterator

from triptych.engines.base import DecodeEngine
from triptych.engines.registry import EngineConfig
from triptych.engines.rooms import RoomPrefillEngine
from triptych.engines.sglang.language import LanguageEngine
from triptych.observability import metrics
from triptych.protocol import (
    BootstrapInfo,
    ErrorCode,
    GenerateRequest,
    RoomReady,
    ServiceError,
    TokenChunk,
)
from triptych.transfer import BootstrapClient, ImageEmbeddings

ABORT_RETRY_S = 0.01
"""How often decode retries an abort that SGLang could not take yet (request not registered:
its stream registers it on its first step)."""
ABORT_TRIES = 1000


class SglangPrefillEngine(RoomPrefillEngine):
    """Prefills with SGLang and hands the KV cache over through SGLang's bootstrap server."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config.bootstrap_host, 0)  # triptych's room: outcomes only
        self.language = LanguageEngine(config, "prefill")

    async def start(self) -> None:
        self.language.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        self.language.close()

    @property
    def bootstrap_address(self) -> tuple[str, int]:
        return self.server.host, self.language.bootstrap_port

    def bootstrap_info(self, room: int) -> BootstrapInfo:
        host, port = self.bootstrap_address
        return BootstrapInfo(
            bootstrap_host=host,
            bootstrap_port=port,
            bootstrap_room=room,
            outcome_port=self.server.port,
        )

    async def prefill(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> None:
        async with self.filling(request) as opened:
            # SGLang's prefill request ends once its KV cache reached decode
            async for _ in self.language.stream(
                request_id, request, embeddings, self.bootstrap_info(opened.room)
            ):
                pass
            metrics.TOKENS_PROCESSED.labels("prefill", "prefill").inc(len(request.token_ids))
            opened.ready(RoomReady(room=opened.room))


class SglangDecodeEngine(DecodeEngine):
    """Decodes with SGLang from the KV cache its prefill peer sends."""

    def __init__(self, config: EngineConfig) -> None:
        self.language = LanguageEngine(config, "decode")
        self.rooms = BootstrapClient()

    async def start(self) -> None:
        self.language.start()

    async def close(self) -> None:
        await self.rooms.close()
        self.language.close()

    def context_length(self) -> int | None:
        return self.language.context_length

    async def generate(
        self, request_id: str, request: GenerateRequest, bootstrap: BootstrapInfo
    ) -> AsyncIterator[TokenChunk]:
        if bootstrap.outcome_port is None:
            raise ServiceError(
                ErrorCode.INTERNAL, "the prefill instance is not on the sglang engine"
            )
        shape = request.embeddings.shape if request.embeddings is not None else None
        embeddings = ImageEmbeddings(shape[0], shape[1]) if shape and len(shape) == 2 else None
        failure: list[ServiceError] = []
        watcher = asyncio.create_task(self._watch(request_id, bootstrap, failure))
        try:
            async for chunk in self.language.stream(request_id, request, embeddings, bootstrap):
                yield chunk
        except ServiceError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, rid: str, bootstrap: BootstrapInfo, failure: list[ServiceError]) -> None:
        """Wait for prefill's outcome; on a failure abort the SGLang request at once."""
        assert bootstrap.outcome_port is not None
        try:
            await self.rooms.join(
                bootstrap.bootstrap_host, bootstrap.outcome_port, bootstrap.bootstrap_room
            )
        except ServiceError as error:
            failure.append(error)
            for _ in range(ABORT_TRIES):
                if self.language.abort(rid):
                    return
                await asyncio.sleep(ABORT_RETRY_S)
