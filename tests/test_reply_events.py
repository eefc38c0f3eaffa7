"""Streamed events: the text-only event set into a serialized frame equals the model's own."""

from typing import Any

import pytest

from triptych.components.frontend.chat import ChatReply
from triptych.components.frontend.completions import CompletionReply
from triptych.components.frontend.middleware import Exchange
from triptych.components.frontend.reply import Reply, sse
from triptych.protocol import TokenChunk

TEXTS = [
    "Hello",
    " world",
    'a "quoted" \\ back\\slash',
    "line\nbreak\ttab\r\x00\x1f",
    "naïve café — 東京 🚀",
    "\u2028\u2029</script>",
    "\x00triptych-text\x00",
]


class _Output:
    finished = False
    finish_reason = None
    chunk_logprobs: list[Any] = []


def _reply(kind: type[Reply], choices: int) -> Reply:
    reply = kind(
        "chatcmpl-abc",
        "tiny/model",
        choices=None,  # type: ignore[arg-type]
        outputs=[_Output() for _ in range(choices)],  # type: ignore[misc]
        prompt_tokens=3,
        token_text=None,  # type: ignore[arg-type]
        exchange=Exchange(),
        stream=True,
        include_usage=False,
        return_token_ids=False,
        logprobs=False,
    )
    reply.opening()
    return reply


@pytest.mark.parametrize("kind", [ChatReply, CompletionReply])
def test_text_events_are_byte_for_byte_the_models_own(kind: type[Reply]) -> None:
    reply = _reply(kind, choices=2)
    for index in (0, 1):
        for text in TEXTS:
            event = reply.delta(index, text, TokenChunk(token_ids=[1]))
            assert event is not None
            assert reply._text_sse(index, text) == sse(event)
