"""The ``hf`` encode engine: the vision tower alone, batching images and videos across
requests."""

import asyncio
import time
from collections.abc import Sequence

import torch

from triptych.engines.base import EncodeEngine, Runner
from triptych.engines.encode_batches import EncodeBatches, EncodeJob
from triptych.engines.load import METER
from triptych.models.video_decoder import VideoRejected
from triptych.models.vision_tower import VideoClip, VisionTower
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ImageItem, MediaItem, ServiceError, VideoItem
from triptych.transfer import ImageEmbeddings


def _tower_input(item: MediaItem) -> bytes | VideoClip:
    if isinstance(item, VideoItem):
        return VideoClip(item.data or b"", tuple(item.frame_indices), item.width, item.height)
    return item.data or b""


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
        self.runner = runner
        """Where vision forwards run (default: a thread of their own)."""
        self.tower: VisionTower | None = None
        self.batches = EncodeBatches(self._run, max_batch_images, "encode-batches")

    async def start(self) -> None:
        if self.tower is None:
            self.tower = await asyncio.to_thread(VisionTower, self.model_path, self.device)
            METER.add_queue(lambda: len(self.batches.pending))  # requests waiting for the tower
            self.batches.start()

    async def close(self) -> None:
        await self.batches.close()

    async def encode(
        self, request_id: str, images: Sequence[ImageItem], videos: Sequence[VideoItem] = ()
    ) -> ImageEmbeddings:
        media: list[MediaItem] = sorted([*images, *videos], key=lambda item: item.offset)
        if any(item.data is None for item in media):
            raise ServiceError(ErrorCode.INTERNAL, "an image reached the encoder without bytes")
        return await self.batches.submit(EncodeJob(media))

    async def _run(self, batch: list[EncodeJob]) -> None:
        assert self.tower is not None
        tower = self.tower
        metrics.ENCODE_BATCH.observe(sum(len(job.images) for job in batch))
        started = time.perf_counter()
        # preprocessing is host work: it stays off the runner (a model thread between decode
        # steps), which gets only the forward; each request's own, so that a video that will
        # not decode fails its request and no other
        preprocessed = await asyncio.gather(
            *(
                asyncio.to_thread(tower.preprocess, [_tower_input(item) for item in job.images])
                for job in batch
            ),
            return_exceptions=True,
        )
        ready: list[tuple[EncodeJob, torch.Tensor, torch.Tensor]] = []
        for job, result in zip(batch, preprocessed, strict=True):
            if isinstance(result, BaseException):
                job.fail(_preprocess_failure(result))
            else:
                ready.append((job, *result))
        if not ready:
            return
        pixels = torch.cat([p for _, p, _ in ready])
        grids = torch.cat([g for _, _, g in ready])
        try:
            # the layouts the forward derives from the grids, and pinning, are host work too
            batch_input = await asyncio.to_thread(tower.prepare, pixels, grids)
            METER.host(time.perf_counter() - started)
            if self.runner is None:
                with METER.busy("encode"):
                    embeddings = await asyncio.to_thread(tower.run, batch_input)
            else:
                embeddings = await self.runner(lambda: tower.run(batch_input))
        except Exception as error:
            failure = ServiceError(ErrorCode.INTERNAL, f"vision tower failed: {error}")
            for job, _, _ in ready:
                job.fail(failure)
            return
        metrics.ENCODE_DURATION.observe(time.perf_counter() - started)
        # a video counts as its temporal patches: pictures the tower encoded, as the mock counts
        METER.count("images", sum(_pictures(job.images) for job, _, _ in ready))
        start = 0
        for job, _, job_grids in ready:
            count = sum(tower.tokens(job_grids))
            part = embeddings[start : start + count]
            start += count
            expected_grids = [tuple(item.grid_thw) for item in job.images]
            got = [tuple(g) for g in job_grids.tolist()]
            if got != expected_grids:
                message = f"image grids {got} differ from the prompt's {expected_grids}"
                job.fail(ServiceError(ErrorCode.INTERNAL, message))
            elif not job.future.done():
                job.future.set_result(
                    ImageEmbeddings(num_tokens=count, hidden_size=int(part.shape[-1]), tensor=part)
                )


def _pictures(items: Sequence[MediaItem]) -> int:
    return sum(item.grid_thw[0] if isinstance(item, VideoItem) else 1 for item in items)


def _preprocess_failure(error: BaseException) -> ServiceError:
    """A video the frontend decoded cannot fail here unless the bytes differ: still the
    client's input, so a 400; anything else is ours."""
    if isinstance(error, VideoRejected):
        return ServiceError(ErrorCode.BAD_REQUEST, f"video refused by the encoder: {error}")
    return ServiceError(ErrorCode.INTERNAL, f"preprocessing failed: {error}")
