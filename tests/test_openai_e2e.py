"""The official openai client against a running E/P/D stack (four processes, real NATS)."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.stack import Stack

MODEL = "tiny-qwen2.5-vl"


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_list(epd_stack: Stack) -> None:
    models = client(epd_stack).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_non_streaming_chat(epd_stack: Stack) -> None:
    reply = client(epd_stack).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streaming_chat_matches_non_streaming(epd_stack: Stack) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client(epd_stack).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, seed=7
    )
    chunks = list(
        client(epd_stack).chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_stop_string_cuts_output(epd_stack: Stack) -> None:
    first = client(epd_stack).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stop test"}], max_tokens=30, seed=3
    )
    text = first.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    cut = client(epd_stack).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stop test"}],
        max_tokens=30,
        seed=3,
        stop=[stop],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_images_are_expanded_to_their_token_count(epd_stack: Stack) -> None:
    def prompt_tokens(content: object) -> int:
        reply = client(epd_stack).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    text_only = prompt_tokens([{"type": "text", "text": "What is this?"}])
    # 448x448 -> 256 tokens; 380x570 -> 280 tokens; each image adds start/end tokens too
    with_images = prompt_tokens(
        [
            {"type": "image_url", "image_url": {"url": png_data_url(448, 448)}},
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": png_data_url(570, 380)}},
        ]
    )
    assert with_images - text_only == 256 + 280 + 2 * 2


BAD_REQUESTS = [
    (b'{"model": "tiny-qwen2.5-vl", "messages": [', 400, "malformed JSON"),
    (b'{"model": "tiny-qwen2.5-vl"}', 400, "messages"),
    (b'{"model": "tiny-qwen2.5-vl", "messages": []}', 400, "messages"),
    (b'{"model": "tiny-qwen2.5-vl", "messages": "hi"}', 400, "messages"),
    (b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": 5}]}', 400, "content"),
    (
        b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "wizard", "content": "x"}]}',
        400,
        "role",
    ),
    (
        b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": '
        b'[{"type": "audio", "audio": "x"}]}]}',
        400,
        "content",
    ),
    (
        b'{"model": "tiny-qwen2.5-vl", "max_tokens": "many", "messages": '
        b'[{"role": "user", "content": "x"}]}',
        400,
        "max_tokens",
    ),
    (
        b'{"model": "tiny-qwen2.5-vl", "n": 0, "messages": [{"role": "user", "content": "x"}]}',
        400,
        "'n' must be at least 1",
    ),
    (
        b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "no-such-model",
    ),
    (b"[1, 2, 3]", 400, "body"),
]


@pytest.mark.parametrize(("body", "status", "mentions"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error(
    epd_stack: Stack, body: bytes, status: int, mentions: str
) -> None:
    reply = httpx.post(
        f"{epd_stack.url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert reply.status_code == status
    error = reply.json()["error"]
    assert mentions in error["message"]
    assert error["type"] in {"invalid_request_error", "not_found_error"}
    assert "Traceback" not in reply.text


def test_stack_keeps_serving_after_bad_input(epd_stack: Stack) -> None:
    for body, _, _ in BAD_REQUESTS:
        httpx.post(f"{epd_stack.url}/v1/chat/completions", content=body, timeout=10)
    reply = client(epd_stack).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason == "length"
    assert httpx.get(f"{epd_stack.url}/ready", timeout=5).status_code == 200


def test_openai_client_raises_typed_errors(epd_stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        client(epd_stack).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="context length"):
        client(epd_stack).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6
        )
