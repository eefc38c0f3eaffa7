"""Streamed events: the text-only event set into a serialized frame equals the model's own;
keys a reply does not use are left out, as in OpenAI's."""

import json
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


def _reply(kind: type[Reply], choices: int, return_token_ids: bool = False) -> Reply:
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
        return_token_ids=return_token_ids,
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


def _json(event: Any) -> Any:
    return json.loads(sse(event).removeprefix(b"data: "))


def test_only_the_opening_chat_event_names_the_role() -> None:
    reply = _reply(ChatReply, choices=1)
    [opening] = reply.opening()
    assert _json(opening)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    event = _json(reply.delta(0, "hi", TokenChunk(token_ids=[7])))
    assert event["choices"][0]["delta"] == {"content": "hi"}


@pytest.mark.parametrize("kind", [ChatReply, CompletionReply])
@pytest.mark.parametrize("asked", [False, True])
def test_events_carry_token_ids_only_when_asked(kind: type[Reply], asked: bool) -> None:
    reply = _reply(kind, choices=1, return_token_ids=asked)
    [choice] = _json(reply.delta(0, "hi", TokenChunk(token_ids=[7])))["choices"]
    assert choice.get("token_ids", "absent") == ([7] if asked else "absent")
    assert choice["finish_reason"] is None  # OpenAI's chunks keep this null key
