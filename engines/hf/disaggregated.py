"""The ``hf`` prefill and decode engines: the KV cache moves through a bootstrap room + NIXL.

Prefill opens the room, prefills on its model thread, exports the packed cache from its
registered memory and tells the room where it is; decode joins the room, READs the cache
straight into its own registered memory, notifies prefill (which frees its copy), and decodes
in its shared batch.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from triptych.engines.base import DecodeEngine, Runner
from triptych.engines.hf import kv_transfer
from triptych.engines.hf.executor import PREFILL_BATCH, Decoding, ModelExecutor, load_executor
from triptych.engines.hf.streaming import decode_stream
from triptych.engines.rooms import RoomPrefillEngine
from triptych.models.mrope import media_grids
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
from triptych.transfer.handles import to_handle, to_ref

log = logging.getLogger(__name__)

KV_HOLD_S = 60.0
"""How long prefill keeps an exported cache for a decode that has not read it."""
KV_READ_S = 30.0
"""How long decode waits for a cache's bytes (under `KV_HOLD_S`, so the region stays put)."""


class HfPrefillEngine(RoomPrefillEngine):
    """Prefills requests and offers their KV caches in bootstrap rooms."""

    def __init__(
        self,
        model_path: str,
        agent: TransferAgent,
        device: str = "cpu",
        bootstrap_host: str = "127.0.0.1",
        bootstrap_port: int = 0,
        *,
        advertise_host: str | None = None,
        prefill_batch: int = PREFILL_BATCH,
    ) -> None:
        super().__init__(bootstrap_host, bootstrap_port, advertise_host)
        self.prefill_batch = prefill_batch
        self.model_path = model_path
        self.device = device
        self.agent = agent
        self.executor: ModelExecutor | None = None

    async def start(self) -> None:
        if self.executor is None:
            self.executor = await load_executor(
                self.model_path, self.device, None, "prefill", self.prefill_batch
            )
            await super().start()

    def model_runner(self) -> Runner | None:
        return self.executor.runner() if self.executor is not None else None

    async def close(self) -> None:
        await super().close()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.close)

    async def prefill(
        self,
        request_id: str,
        request: GenerateRequest,
        room: int,
        embeddings: ImageEmbeddings | None,
    ) -> None:
        assert self.executor is not None, "start() first"
        model = self.executor.model
        slot = self.server.open(room)
        key = f"kv-{room}"
        try:
            grids = media_grids(request)
            tensor = embeddings.tensor if embeddings is not None else None
            sequence, hidden = await self.executor.prefill((request.token_ids, grids, tensor))
            metrics.TOKENS_PROCESSED.labels("prefill", "prefill").inc(len(request.token_ids))
            packed = kv_transfer.pack(sequence, hidden)
            ref = await self.agent.export_when_room(packed, key, KV_READ_S)
            slot.ready(
                RoomReady(
                    room=room,
                    rope_delta=sequence.rope_delta,
                    kv=KVHandle(
                        tensor=to_handle(ref),
                        num_tokens=sequence.length,
                        layout=kv_transfer.layout(model),
                    ),
                )
            )
            await self.agent.wait_released(key, KV_HOLD_S)
        except BaseException as error:
            slot.fail(f"prefill failed: {error}" if str(error) else "prefill cancelled")
            raise
        finally:
            self.agent.release(key)
            slot.close()


class HfDecodeEngine(DecodeEngine):
    """Receives KV caches through bootstrap rooms and decodes them in one batch."""

    def __init__(
        self,
        model_path: str,
        agent: TransferAgent,
        device: str = "cpu",
        decoding: Decoding | None = None,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.agent = agent
        self.decoding = decoding or Decoding()
        self.rooms = BootstrapClient()
        self.executor: ModelExecutor | None = None

    async def start(self) -> None:
        if self.executor is None:
            self.executor = await load_executor(
                self.model_path, self.device, self.decoding, "decode"
            )

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        assert self.executor is not None, "start() first"
        return self.executor.reservation(len(request.token_ids))

    async def close(self) -> None:
        await self.rooms.close()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.close)

    async def generate(
        self, request_id: str, request: GenerateRequest, bootstrap: BootstrapInfo
    ) -> AsyncIterator[TokenChunk]:
        assert self.executor is not None, "start() first"
        model = self.executor.model
        host, port = bootstrap.bootstrap_host, bootstrap.bootstrap_port
        ready = await self.rooms.join(host, port, bootstrap.bootstrap_room)
        if ready.kv is None or ready.kv.layout != kv_transfer.layout(model):
            raise ServiceError(ErrorCode.INTERNAL, "prefill's KV layout does not match decode's")
        started = time.perf_counter()
        nbytes = ready.kv.tensor.shape[0] * model.dtype.itemsize
        try:
            flat = await self.agent.fetch(to_ref(ready.kv.tensor), KV_READ_S)
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
        sequence, hidden = kv_transfer.unpack(model, flat, ready.kv.num_tokens, ready.rope_delta)
        async for chunk in decode_stream(self.executor, request_id, request, sequence, hidden):
            yield chunk


def _record_transfer(kind: str, nbytes: int, started: float, outcome: str) -> None:
    metrics.TRANSFER_BYTES.labels(kind, outcome).inc(nbytes)
    metrics.TRANSFER_DURATION.labels(kind, outcome).observe(time.perf_counter() - started)
