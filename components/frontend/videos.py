"""Fetching and checking videos: each ``video_url`` is fetched once, probed, sampled as the
checkpoint's processor samples it, and decoded up to its last sampled frame.

Limits come first: bytes while fetching, frame size, frame count and duration from the
container before any frame is decoded (a decompression bomb stops there), then decoding stops
at the last sampled frame. The bytes that pass are the bytes the encoder decodes again.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from triptych.components.frontend.config import VideoLimits
from triptych.components.frontend.fetch import MediaFetcher, bad_request
from triptych.models import VideoLayout
from triptych.models.video_decoder import (
    VideoBounds,
    VideoProbe,
    VideoRejected,
    check_frames,
    probe_video,
)
from triptych.observability import metrics
from triptych.protocol import ServiceError

Planner = Callable[[VideoProbe], VideoLayout]
"""The model's sampling and token layout for a probed video (ValueError if it has none)."""


@dataclass(frozen=True)
class LoadedVideo:
    """A validated video: its encoded bytes, what it holds and how the model will see it."""

    data: bytes
    probe: VideoProbe
    layout: VideoLayout


class VideoLoader:
    """Loads ``http(s)://``, ``data:video/...;base64,`` and allow-listed ``file://`` videos."""

    def __init__(self, limits: VideoLimits, fetcher: MediaFetcher) -> None:
        self.limits = limits
        self.fetcher = fetcher
        self.bounds = VideoBounds(limits.max_frames, limits.max_pixels, limits.max_duration_s)

    async def load_all(self, urls: list[str], plan: Planner) -> list[LoadedVideo]:
        """Load every video concurrently; the first failure fails the request."""
        if len(urls) > self.limits.max_videos:
            raise bad_request(f"too many videos: {len(urls)} (at most {self.limits.max_videos})")
        return list(await asyncio.gather(*(self.load(url, plan) for url in urls)))

    async def load(self, url: str, plan: Planner) -> LoadedVideo:
        """Fetch, probe, sample and check one video."""
        try:
            data = await self.fetcher.read(url, "video", self.limits.max_bytes)
            return await asyncio.to_thread(self._check, data, plan)
        except ServiceError:
            metrics.VIDEOS_REJECTED.inc()
            raise

    def _check(self, data: bytes, plan: Planner) -> LoadedVideo:
        try:
            probe = probe_video(data, self.bounds)
            try:
                layout = plan(probe)
            except ValueError as error:
                raise bad_request(f"video cannot be sampled: {error}") from None
            check_frames(data, layout.frame_indices, self.bounds)
        except VideoRejected as error:
            raise bad_request(str(error)) from None
        return LoadedVideo(data=data, probe=probe, layout=layout)
