"""The ``hf`` prefill and decode engines: the KV cache moves through a bootstrap room + NIXL.

Prefill opens the room, prefills on its model thread (packing the prompt's cache into one tensor
as it completes), exports it from its registered memory and tells the room where it is; decode
joins the room, READs the cache into its own registered memory, notifies prefill (which frees
its copy), copies the keys and values into the blocks it admitted the request with, and decodes
in its shared batch.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from triptych.engines.base import DecodeEngine, Runner
from triptych.engines.hf import kv_transfer
from triptych.engines.hf.admissions import Admissions, stop_ids
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore, load_core
from triptych.engines.hf.sequence import Prompt
from triptych.engines.rooms import RoomPrefillEngine
from triptych.models.mrope import media_grids
from triptych.models.prefix import request_block_keys
from triptych.observability import metrics
from triptych.protocol import (
    BootstrapInfo,
    ErrorCode,
    GenerateRequest,
    KVHandle,
    RoomReady,
    ServiceError,
    TokenChunk,
)
from triptych.transfer import (
    BootstrapClient,
    ImageEmbeddings,
    PoolFull,
    TransferAgent,
    TransferError,
)

log = logging.getLogger(__name__)

KV_HOLD_S = 60.0
"""How long prefill keeps an exported cache for a decode that has not read it."""
KV_READ_S = 30.0
"""How long decode waits for a cache's bytes (under `KV_HOLD_S`, so the region stays put)."""


class HfPrefillEngine(RoomPrefillEngine):
    """Prefills requests and offers their KV caches in bootstrap rooms; a prompt's cached
    prefix (`HfConfig.prefix_cache`) is not computed again."""

    def __init__(
        self,
        model_path: str,
        agent: TransferAgent,
        device: str = "cpu",
        bootstrap_host: str = "127.0.0.1",
        bootstrap_port: int = 0,
        *,
        advertise_host: str | None = None,
        config: HfConfig | None = None,
    ) -> None:
        super().__init__(bootstrap_host, bootstrap_port, advertise_host)
        self.config = config or HfConfig()
        self.model_path = model_path
        self.device = device
        self.agent = agent
        self.core: EngineCore | None = None

    async def start(self) -> None:
        if self.core is None:
            self.core = await load_core(self.model_path, self.device, self.config, False, "prefill")
            await super().start()

    def model_runner(self) -> Runner | None:
        return self.core.on_model_thread() if self.core is not None else None

    async def close(self) -> None:
        await super().close()
        if self.core is not None:
            await asyncio.to_thread(self.core.close)

    async def prefill(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> None:
        assert self.core is not None, "start() first"
        model = self.core.model
        async with self.filling(request) as opened:
            key = f"kv-{opened.room}"
            try:
                self.core.check_fits(len(request.token_ids))
                grids = media_grids(request)
                tensor = embeddings.tensor if embeddings is not None else None
                prompt = Prompt(request.token_ids, grids, tensor)
                keys = None
                if self.core.runner.config.prefix_cache:  # the runner turns it off without space
                    keys = request_block_keys(request, self.config.page_size)
                packed, rope_delta, cached = await self.core.prefill_only(request_id, prompt, keys)
                ref = await self.agent.export_when_space(packed, key, KV_READ_S)
                del packed  # the pool holds it now
                opened.ready(
                    RoomReady(
                        room=opened.room,
                        rope_delta=rope_delta,
                        cached_tokens=cached,
                        kv=KVHandle(
                            tensor=ref,
                            num_tokens=len(request.token_ids),
                            layout=kv_transfer.layout(model),
                        ),
                    )
                )
                await self.agent.wait_released(key, KV_HOLD_S)
            finally:
                self.agent.release(key)


class HfDecodeEngine(DecodeEngine):
    """Receives KV caches through bootstrap rooms and decodes them in one batch."""

    def __init__(
        self,
        model_path: str,
        agent: TransferAgent,
        device: str = "cpu",
        config: HfConfig | None = None,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.agent = agent
        self.config = config or HfConfig()
        self.rooms = BootstrapClient()
        self.core: EngineCore | None = None
        self.admissions = Admissions()

    async def start(self) -> None:
        if self.core is None:
            # the cache arrives whole from prefill: nothing to reuse here
            config = replace(self.config, prefix_cache=False)
            self.core = await load_core(self.model_path, self.device, config, True, "decode")

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        assert self.core is not None, "start() first"
        return self.admissions.hold(self.core, request)

    def context_length(self) -> int | None:
        return self.core.max_len if self.core is not None else None

    async def close(self) -> None:
        await self.rooms.close()
        if self.core is not None:
            await asyncio.to_thread(self.core.close)

    async def generate(
        self, request_id: str, request: GenerateRequest, bootstrap: BootstrapInfo
    ) -> AsyncIterator[TokenChunk]:
        assert self.core is not None, "start() first"
        sequence = self.admissions.take(request)
        sequence.request_id = request_id
        model = self.core.model
        host, port = bootstrap.bootstrap_host, bootstrap.bootstrap_port
        ready = await self.rooms.join(host, port, bootstrap.bootstrap_room)
        if ready.kv is None or ready.kv.layout != kv_transfer.layout(model):
            raise ServiceError(ErrorCode.INTERNAL, "prefill's KV layout does not match decode's")
        if ready.kv.num_tokens != len(request.token_ids):
            raise ServiceError(
                ErrorCode.INTERNAL,
                f"prefill sent {ready.kv.num_tokens} positions for {len(request.token_ids)} tokens",
            )
        started = time.perf_counter()
        nbytes = ready.kv.tensor.shape[0] * model.dtype.itemsize
        try:
            flat = await self.agent.fetch(ready.kv.tensor, KV_READ_S)
        except (TransferError, PoolFull) as error:
            _record_transfer("kv", nbytes, started, "error")
            raise ServiceError(
                ErrorCode.UNAVAILABLE, f"KV cache could not be read: {error}"
            ) from error
        finally:
            await self.rooms.done(host, port, bootstrap.bootstrap_room)
        _record_transfer("kv", nbytes, started, "ok")
        log.info(
            "KV cache %s: %d bytes (%d tokens) read in %.3f ms",
            request_id,
            nbytes,
            ready.kv.num_tokens,
            (time.perf_counter() - started) * 1e3,
        )
        received = kv_transfer.unpack(model, flat, ready.kv.num_tokens)
        sequence.rope_delta = ready.rope_delta
        sequence.cached = ready.cached_tokens  # served by prefill's prefix cache, for the usage
        prompt = Prompt(request.token_ids)
        chunks = self.core.generate(sequence, request.sampling, stop_ids(request), prompt, received)
        async for chunk in chunks:
            yield chunk


def _record_transfer(kind: str, nbytes: int, started: float, outcome: str) -> None:
    metrics.TRANSFER_BYTES.labels(kind, outcome).inc(nbytes)
    metrics.TRANSFER_DURATION.labels(kind, outcome).observe(time.perf_counter() - started)
