"""Incremental detokenization and stop strings: token ids in, text deltas out."""

from typing import Any

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Decodes a short window of recent tokens (prefix/read offsets), so each step costs the
    window, not the whole output; a delta ending in a partial UTF-8 sequence waits for more.
    The steps run in `tokenizers`' own `DecodeStream`, which keeps the same window; this
    class keeps the offsets too, to flush what the stream still holds at the end, and decodes
    the window itself where the stream cannot (a decoder whose text for the window's start
    changes as tokens follow).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text they complete."""
        self.token_ids.extend(token_ids)
        if self._stream is not None:
            try:
                step = token_ids[0] if len(token_ids) == 1 else token_ids  # an int is faster
                text = self._stream.step(self._backend, step)
            except Exception:  # its prefix check failed: go on with the window below
                self._stream = None
            else:
                if text is None:
                    return ""
                self._prefix, self._read = self._read, len(self.token_ids)
                return str(text)
        before, after = self._decode_window()
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held back at the end of generation (even a partial character)."""
        if self._read == len(self.token_ids):
            return ""
        before, after = self._decode_window()
        self._prefix = self._read = len(self.token_ids)
        self._stream = None
        return after[len(before) :]

    def _decode_window(self) -> tuple[str, str]:
        """The window's text up to the read offset, and with every token since."""
        window = self.token_ids[self._prefix :]
        before = self._backend.decode(window[: self._read - self._prefix], self._skip)
        return str(before), str(self._backend.decode(window, self._skip))


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
