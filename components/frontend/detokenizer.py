"""Incremental detokenization and stop strings: token ids in, text deltas out."""

from typing import Any


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Decodes a short window of recent tokens (prefix/read offsets), so each step costs the
    window, not the whole output; a delta ending in a partial UTF-8 sequence waits for more.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text they complete."""
        self.token_ids.extend(token_ids)
        window = self.token_ids[self._prefix :]
        before = self._backend.decode(self.token_ids[self._prefix : self._read], self._skip)
        after = self._backend.decode(window, self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return str(after[len(before) :])

    def flush(self) -> str:
        """Text still held back at the end of generation (even a partial character)."""
        before = self._backend.decode(self.token_ids[self._prefix : self._read], self._skip)
        after = self._backend.decode(self.token_ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self.token_ids)
        return str(after[len(before) :])


class StopMatcher:
    """Holds back text that might begin a stop string; cuts the output at the first match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str, final: bool) -> str:
        """Add text; return what may be shown now (all of it when `final`)."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        self._text += delta
        search_from = max(0, self._emitted - self._hold)
        cut = min(
            (i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final or not self._stops:
            end = len(self._text)
        else:
            end = max(self._emitted, len(self._text) - self._hold)
        shown, self._emitted = self._text[self._emitted : end], end
        return shown
