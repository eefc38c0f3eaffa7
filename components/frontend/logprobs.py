"""Token log-probabilities in OpenAI's shapes: each token as text and as its exact bytes.

A byte-level BPE token may hold part of a UTF-8 character; its text then shows U+FFFD while
``bytes`` keeps what the client needs to rebuild the text exactly (as OpenAI does).
"""

from typing import Any

from triptych.protocol import (
    ChatLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """Each token id's text and bytes, as the model's tokenizer defines them (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = tokenizer.backend_tokenizer
        self._byte_level = type(backend.decoder).__name__ == "ByteLevel"
        self._special = set(tokenizer.all_special_ids) | set(
            getattr(tokenizer, "added_tokens_decoder", {}) or {}
        )
        self._decoder = _byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, bytes)`` of one token."""
        known = self._cache.get(token_id)
        if known is not None:
            return known
        raw = self._tokenizer.convert_ids_to_tokens(token_id)
        if raw is None:
            data = b""
        elif self._byte_level and token_id not in self._special:
            data = bytes(self._decoder.get(c, 0x3F) for c in raw)
        else:
            data = self._tokenizer.decode([token_id]).encode()
        entry = (data.decode("utf-8", errors="replace"), list(data))
        self._cache[token_id] = entry
        return entry

    def chat(self, tokens: list[tuple[int, TokenLogprob]]) -> ChoiceLogprobs:
        """The chat ``logprobs`` object of `tokens` (id and log-probability of each)."""
        content = []
        for token_id, entry in tokens:
            text, data = self(token_id)
            top = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in self._top(entry)]
            content.append(
                ChatLogprob(token=text, logprob=entry.logprob, bytes=data, top_logprobs=top)
            )
        return ChoiceLogprobs(content=content)

    def completion(
        self, tokens: list[tuple[int, TokenLogprob]], offset: int = 0
    ) -> CompletionLogprobs:
        """The legacy completions ``logprobs`` object; text offsets count from `offset`."""
        result = CompletionLogprobs(top_logprobs=[])
        for token_id, entry in tokens:
            text, _ = self(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(entry.logprob)
            assert result.top_logprobs is not None
            result.top_logprobs.append({t: lp for t, _, lp in self._top(entry)})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _top(self, entry: TokenLogprob) -> list[tuple[str, list[int], float]]:
        return [(*self(token_id), logprob) for token_id, logprob in entry.top]
