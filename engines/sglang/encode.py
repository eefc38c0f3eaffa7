"""The ``sglang`` encode engine: SGLang's ``MMEncoder`` in this worker's own process.

``MMEncoder`` (SGLang 0.5.23, ``sglang.srt.disaggregation.encoder.server``) builds and loads
only the checkpoint's vision tower and runs SGLang's own image preprocessing. Its coroutines
run its forward synchronously, so the encoder lives on an event loop of its own thread
(`LoopThread`) and this worker's loop only awaits the result. Images are the ones the
frontend already fetched and checked: they reach SGLang decoded, as PIL images, and SGLang
fetches nothing. The embeddings come back as a tensor that the encode worker publishes in
its NIXL pool exactly as the ``hf`` encoder's.

SGLang's config is process-wide (``publish``): an ``MMEncoder`` cannot share a process with
an ``sglang.Engine``, which is why `inline_refusal` exists.

Videos are refused with a 400 (`VIDEO_REFUSAL`): SGLang's encoder would sample and resize the
frames with its own loader and rules, not the checkpoint processor's that the frontend used to
count the video's tokens, so its rows could not be trusted to match the prompt; the ``hf``
encoder embeds videos.
"""

import asyncio
import io
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from triptych.engines.base import EncodeEngine
from triptych.engines.encode_batches import EncodeBatches, EncodeJob
from triptych.engines.registry import EngineConfig
from triptych.engines.sglang.loop_thread import LoopThread
from triptych.engines.sglang.server_args import free_port, server_args
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ImageItem, MediaItem, ServiceError, VideoItem
from triptych.transfer import ImageEmbeddings

log = logging.getLogger(__name__)

VIDEO_REFUSAL = (
    "the sglang encoder does not embed videos; serve videos with --encode-engine hf "
    "(images are served as usual)"
)


@dataclass(eq=False)
class _Job(EncodeJob):
    rid: str = ""
    """SGLang's id of the request (one per call)."""


def _decode(images: Sequence[MediaItem]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image.data or b"")).convert("RGB") for image in images]


class SglangEncodeEngine(EncodeEngine):
    """Embeds images with SGLang's ``MMEncoder``; requests that arrive together share one
    forward (SGLang's ``batch_encode``)."""

    def __init__(self, config: EngineConfig, max_batch_images: int = 32) -> None:
        self.config = config
        self.encoder: Any = None
        self._thread: LoopThread | None = None
        self.batches = EncodeBatches(self._run, max_batch_images, "sglang-encode-batches")
        self._ids = itertools.count()

    async def start(self) -> None:
        if self.encoder is not None:
            return
        self._thread = LoopThread("sglang-encoder")
        started = time.perf_counter()
        self.encoder = await self._thread.run(self._build())
        log.info("SGLang MMEncoder ready in %.1f s", time.perf_counter() - started)
        self.batches.start()

    async def _build(self) -> Any:
        from sglang.srt.disaggregation.encoder.server import MMEncoder
        from sglang.srt.runtime_context import publish

        args = server_args(self.config, "encoder")
        publish(args, role="encoder")
        init = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"  # a world of one, on loopback
        return MMEncoder(args, dist_init_method=init)

    async def close(self) -> None:
        await self.batches.close()
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    async def encode(
        self, request_id: str, images: Sequence[ImageItem], videos: Sequence[VideoItem] = ()
    ) -> ImageEmbeddings:
        if videos:
            raise ServiceError(ErrorCode.BAD_REQUEST, VIDEO_REFUSAL)
        if any(image.data is None for image in images):
            raise ServiceError(ErrorCode.INTERNAL, "an image reached the encoder without bytes")
        # SGLang keys its per-request state by id: one per call, even for a repeated request
        rid = f"{request_id}#{next(self._ids)}"
        return await self.batches.submit(_Job(images, rid=rid))

    async def _run(self, batch: list[_Job]) -> None:
        assert self._thread is not None
        metrics.ENCODE_BATCH.observe(sum(len(job.images) for job in batch))
        started = time.perf_counter()
        try:
            pictures = await asyncio.to_thread(lambda: [_decode(job.images) for job in batch])
            outcomes = await self._thread.run(self._forward(batch, pictures))
        except Exception as error:
            failure = ServiceError(ErrorCode.INTERNAL, f"SGLang encoder failed: {error}")
            for job in batch:
                job.fail(failure)
            return
        metrics.ENCODE_DURATION.observe(time.perf_counter() - started)
        for job, outcome in zip(batch, outcomes, strict=True):
            if not job.future.done():
                if isinstance(outcome, ServiceError):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def _forward(
        self, batch: list[_Job], pictures: list[list[Image.Image]]
    ) -> list[ImageEmbeddings | ServiceError]:
        """On the encoder's thread: one fused forward, then each request's rows and grids."""
        from sglang.srt.managers.schedule_batch import Modality

        encoder = self.encoder
        requests = [
            {"req_id": job.rid, "num_parts": 1, "part_idx": 0, "mm_items": items, "hashes": None}
            for job, items in zip(batch, pictures, strict=True)
        ]
        results = await encoder.batch_encode(requests, Modality.IMAGE)
        outcomes: list[ImageEmbeddings | ServiceError] = []
        for job, (_, _, _, error, code) in zip(batch, results, strict=True):
            try:
                if error is not None:
                    status = int(code or 500)
                    outcomes.append(ServiceError(status if status < 500 else 500, error))
                    continue
                staged = encoder.req_states[job.rid].embedding_data
                outcomes.append(_embeddings(job.images, staged.embedding, staged.grid_dim))
            finally:
                await encoder.release_request(job.rid)
        return outcomes


def _embeddings(
    images: Sequence[MediaItem], tensor: torch.Tensor, grids: torch.Tensor
) -> ImageEmbeddings | ServiceError:
    """The request's embeddings, once SGLang's grids agree with the frontend's token counts."""
    got = [tuple(int(v) for v in grid) for grid in torch.as_tensor(grids).tolist()]
    expected = [tuple(image.grid_thw) for image in images]
    if got != expected:
        return ServiceError(
            ErrorCode.INTERNAL, f"SGLang's image grids {got} differ from the prompt's {expected}"
        )
    rows = tensor.reshape(-1, tensor.shape[-1]).contiguous()
    return ImageEmbeddings(
        num_tokens=int(rows.shape[0]), hidden_size=int(rows.shape[1]), tensor=rows
    )
