"""A request whose deadline passes ends with an error, streamed or not, and frees the workers."""

import time

import httpx

from tests.stack import Stack, start_topology

BODY = {
    "model": "tiny-qwen2.5-vl",
    "messages": [{"role": "user", "content": "slow"}],
    "max_tokens": 200,
}


def test_deadline_ends_requests_with_an_error(stack: Stack) -> None:
    start_topology(
        stack,
        "E/P/D",
        "--mock-decode-s-per-step",
        "0.05",
        frontend_args=("--request-timeout-s", "1"),
    )
    begun = time.monotonic()
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=BODY, timeout=30)
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["message"] == "deadline exceeded"
    assert time.monotonic() - begun < 5

    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json={**BODY, "stream": True}, timeout=30
    ) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert '"deadline exceeded"' in lines[-2]
    assert lines[-1] == "data: [DONE]"

    quick = httpx.post(
        f"{stack.url}/v1/chat/completions", json={**BODY, "max_tokens": 3}, timeout=30
    )
    assert quick.status_code == 200
