"""The ``hf`` encode engine: the vision tower alone, batching images across requests."""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from triptych.engines.base import EncodeEngine, Runner
from triptych.engines.load import METER
from triptych.models.vision_tower import VisionTower
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ImageItem, ServiceError
from triptych.transfer import ImageEmbeddings


@dataclass(eq=False)
class _Job:
    images: Sequence[ImageItem]
    future: "asyncio.Future[ImageEmbeddings]"


class HfEncodeEngine(EncodeEngine):
    """Runs the checkpoint's vision tower; requests that arrive together share one forward."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        max_batch_images: int = 32,
        runner: Runner | None = None,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.max_batch_images = max_batch_images
        self.runner = runner
        """Where vision forwards run (default: a thread of their own)."""
        self.tower: VisionTower | None = None
        self._pending: list[_Job] = []
        self._wake = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.tower is None:
            self.tower = await asyncio.to_thread(VisionTower, self.model_path, self.device)
            if self.runner is None:  # inline, the model thread's queue counts it already
                METER.add_queue(lambda: len(self._pending))
            self._batcher = asyncio.create_task(self._batches(), name="encode-batches")

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()

    async def encode(self, request_id: str, images: Sequence[ImageItem]) -> ImageEmbeddings:
        if any(image.data is None for image in images):
            raise ServiceError(ErrorCode.INTERNAL, "an image reached the encoder without bytes")
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    async def _batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch: list[_Job] = []
            count = 0
            while self._pending and (
                not batch or count + len(self._pending[0].images) <= self.max_batch_images
            ):
                job = self._pending.pop(0)
                if job.future.done():  # cancelled while waiting
                    continue
                batch.append(job)
                count += len(job.images)
            if self._pending:
                self._wake.set()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        assert self.tower is not None
        tower = self.tower
        images = [image for job in batch for image in job.images]
        metrics.ENCODE_BATCH.observe(len(images))
        started = time.perf_counter()
        try:
            # preprocessing is host work: it stays off the runner (a model thread between
            # decode steps), which gets only the forward
            pixels, grids = await asyncio.to_thread(
                tower.preprocess, [image.data or b"" for image in images]
            )
            if self.runner is None:
                with METER.busy("encode"):
                    embeddings = await asyncio.to_thread(tower.encode, pixels, grids)
            else:
                embeddings = await self.runner(lambda: tower.encode(pixels, grids))
        except Exception as error:
            failure = ServiceError(ErrorCode.INTERNAL, f"vision tower failed: {error}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        metrics.ENCODE_DURATION.observe(time.perf_counter() - started)
        METER.count("images", len(images))
        rows = tower.tokens(grids)
        start = 0
        index = 0
        for job in batch:
            count = sum(rows[index : index + len(job.images)])
            expected_grids = [tuple(image.grid_thw) for image in job.images]
            got = [tuple(g) for g in grids[index : index + len(job.images)].tolist()]
            index += len(job.images)
            part = embeddings[start : start + count]
            start += count
            if job.future.done():
                continue
            if got != expected_grids:
                job.future.set_exception(
                    ServiceError(
                        ErrorCode.INTERNAL,
                        f"image grids {got} differ from the prompt's {expected_grids}",
                    )
                )
                continue
            job.future.set_result(
                ImageEmbeddings(num_tokens=count, hidden_size=int(part.shape[-1]), tensor=part)
            )
