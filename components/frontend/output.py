"""One choice's output as it arrives: text deltas, stop strings, honest counts, logprobs."""

from typing import Any

from triptych.components.frontend.detokenizer import Detokenizer, StopMatcher
from triptych.protocol import FinishReason, TokenChunk, TokenLogprob


class Output:
    """Accumulates token chunks into text; tells when a stop string ended the request."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self._detokenizer = Detokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[tuple[int, TokenLogprob]] = []
        """Each generated token with its log-probability (when the request asked for them)."""
        self.chunk_logprobs: list[tuple[int, TokenLogprob]] = []
        """Those of the last chunk added."""

    @property
    def finished(self) -> bool:
        """True once the engine finished or a stop string matched."""
        return self.finish_reason is not None

    def add(self, chunk: TokenChunk) -> str:
        """Take one chunk; return the text to show for it."""
        self.chunk_logprobs = []
        if self.finished:
            return ""
        self.completion_tokens += len(chunk.token_ids)
        self.token_ids.extend(chunk.token_ids)
        self.chunk_logprobs = list(zip(chunk.token_ids, chunk.logprobs or (), strict=False))
        self.logprobs.extend(self.chunk_logprobs)
        final = chunk.finish_reason is not None
        delta = self._detokenizer.add(chunk.token_ids)
        if final:
            delta += self._detokenizer.flush()
        shown = self._stops.feed(delta, final)
        if self._stops.stopped:
            self.finish_reason = "stop"
        elif final:
            self.finish_reason = chunk.finish_reason
        if shown:
            self.text.append(shown)
        return shown
