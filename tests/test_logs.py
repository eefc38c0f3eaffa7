"""One request id, from the client's X-Request-Id, on the log lines of all four processes."""

import json

import httpx

from tests.stack import Stack, start_topology
from tests.test_faults import PIXEL

BODY = {
    "model": "tiny-qwen2.5-vl",
    "max_tokens": 3,
    "messages": [{"role": "user", "content": "follow me"}],
}


def test_request_id_follows_the_request_through_every_process(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--log-level", "DEBUG", frontend_args=("--log-level", "DEBUG"))
    content = [{"type": "image_url", "image_url": {"url": PIXEL}}, {"type": "text", "text": "hi"}]
    reply = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={**BODY, "messages": [{"role": "user", "content": content}]},  # text skips encode
        headers={"X-Request-Id": "trace-me-42"},
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.headers["X-Request-Id"] == "trace-me-42"
    assert reply.json()["id"] == "trace-me-42"
    stack.stop()
    for process in stack.processes:
        tagged = [line for line in process.output().splitlines() if "[trace-me-42]" in line]
        assert tagged, f"no line of {process.name} carries the request id"


def test_unsafe_ids_are_replaced_and_json_logs_parse(stack: Stack) -> None:
    start_topology(
        stack,
        "EPD",
        "--log-level",
        "DEBUG",
        "--log-format",
        "json",
        frontend_args=("--log-level", "DEBUG", "--log-format", "json"),
    )
    reply = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=BODY,
        headers={"X-Request-Id": "bad id\\nwith spaces"},
        timeout=30,
    )
    chosen = reply.headers["X-Request-Id"]
    assert chosen.startswith("chatcmpl-")
    stack.stop()
    worker = next(p for p in stack.processes if p.name == "decode")
    entries = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    assert any(entry["request_id"] == chosen for entry in entries)
