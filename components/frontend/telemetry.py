"""One request's contribution to the frontend's metrics."""

import time

from triptych.components.frontend.prompt import Prompt
from triptych.observability import metrics


class RequestTelemetry:
    """Times a request from arrival: first token, gaps between chunks, the end."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._last: float | None = None
        self.ttft_s: float | None = None
        """Arrival to the first token chunk (None until it came)."""
        metrics.IN_FLIGHT.inc()

    def prompts(self, prompts: list[Prompt]) -> None:
        """The request's prompts (one for chat; one per prompt for completions)."""
        for prompt in prompts:
            metrics.INPUT_TOKENS.inc(len(prompt.token_ids))
            metrics.IMAGES.observe(len(prompt.images))
            metrics.IMAGE_TOKENS.observe(sum(image.num_tokens for image in prompt.images))
            metrics.VIDEOS.observe(len(prompt.videos))
            if prompt.videos:
                metrics.VIDEO_TOKENS.observe(sum(video.num_tokens for video in prompt.videos))
                metrics.VIDEO_FRAMES.inc(sum(len(video.frame_indices) for video in prompt.videos))

    def chunk(self, tokens: int) -> None:
        """A chunk of `tokens` tokens arrived from decode."""
        now = time.perf_counter()
        if self._last is None:
            self.ttft_s = now - self.started
            metrics.TTFT.observe(self.ttft_s)
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
