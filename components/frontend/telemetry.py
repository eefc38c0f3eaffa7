"""One chat request's contribution to the frontend's metrics."""

import time

from triptych.observability import metrics
from triptych.protocol import GenerateRequest


class RequestTelemetry:
    """Times a request from arrival: first token, gaps between chunks, the end."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._last: float | None = None
        metrics.IN_FLIGHT.inc()

    def prompt(self, request: GenerateRequest) -> None:
        """The prompt the pipeline received."""
        metrics.INPUT_TOKENS.inc(len(request.token_ids))
        metrics.IMAGES.observe(len(request.images))
        metrics.IMAGE_TOKENS.observe(sum(image.num_tokens for image in request.images))
        metrics.VIDEOS.observe(len(request.videos))
        if request.videos:
            metrics.VIDEO_TOKENS.observe(sum(video.num_tokens for video in request.videos))
            metrics.VIDEO_FRAMES.inc(sum(len(video.frame_indices) for video in request.videos))

    def chunk(self, tokens: int) -> None:
        """A chunk of `tokens` tokens arrived from decode."""
        now = time.perf_counter()
        if self._last is None:
            metrics.TTFT.observe(now - self.started)
        else:
            metrics.ITL.observe(now - self._last)
        self._last = now
        metrics.OUTPUT_TOKENS.inc(tokens)

    def finish(self, client_gone: bool) -> None:
        """The request ended (`client_gone`: the client hung up first)."""
        metrics.IN_FLIGHT.dec()
        metrics.DURATION.observe(time.perf_counter() - self.started)
        if client_gone:
            metrics.DISCONNECTS.inc()
