"""Faults cost exactly the requests they touch: real processes, broken on purpose."""

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.stack import Stack, micro_stats, start_topology
from triptych.runtime.nats_server import NatsServer

SLOW = ("--mock-decode-s-per-step", "0.05")


def body(max_tokens: int = 200, stream: bool = True) -> dict[str, object]:
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "a long answer please"}],
    }


def in_flight(stack: Stack, component: str) -> list[float]:
    return [s.get("in_flight", -1) for s in asyncio.run(micro_stats(stack, component)).values()]


def wait_until(check: object, timeout: float) -> float:
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - begun
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def test_client_disconnect_frees_every_stage(stack: Stack) -> None:
    start_topology(stack, "E/P/D", *SLOW)
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body(), timeout=30) as reply:
        lines = reply.iter_lines()
        for _ in range(4):
            next(lines)
        assert in_flight(stack, "decode") == [1]
    # the client is gone: decode, prefill and encode all let go within about a second
    took = wait_until(
        lambda: all(in_flight(stack, c) == [0] for c in ("decode", "prefill", "encode")), 5
    )
    assert took < 2


def stream_outcome(
    url: str, results: list[str], image: bool = False, first: threading.Event | None = None
) -> None:
    """Stream one request; `results` gets "ok" or "error"; `first` is set at its first token."""
    request = body(100)
    if image:
        request["messages"] = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PIXEL}},
                    {"type": "text", "text": "a long answer please"},
                ],
            }
        ]
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=30) as reply:
            if reply.status_code != 200:
                results.append("error")
                return
            lines = []
            for line in reply.iter_lines():
                if first is not None and '"content":"' in line:
                    first.set()
                if line.startswith("data: "):
                    lines.append(line)
            last = lines[-2]
        results.append("error" if '"error"' in last else "ok")
    except httpx.HTTPError as error:
        results.append(f"transport {error}")


def _pixel() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (7, 7, 7)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


PIXEL = _pixel()
# How to keep a request inside each stage long enough to kill the stage under it.
HOLD = {
    "encode": ("--mock-encode-s-per-image", "1.5"),
    "prefill": ("--mock-prefill-s-per-token", "0.05"),
    "decode": ("--mock-decode-s-per-step", "0.05"),
}


@pytest.mark.parametrize("victim_stage", ["encode", "prefill", "decode"])
def test_killed_worker_fails_only_requests_past_their_first_token(
    stack: Stack, victim_stage: str
) -> None:
    """Requests a killed encode or prefill held had no token yet: they migrate to the other
    instance and succeed. Those a killed decode was streaming fail, within bounded time."""
    start_topology(stack, "E/P/D", *HOLD[victim_stage], copies=2)
    results: list[str] = []
    firsts = [threading.Event() for _ in range(6)]
    threads = [
        threading.Thread(
            target=stream_outcome, args=(stack.url, results, victim_stage == "encode", first)
        )
        for first in firsts
    ]
    for thread in threads:
        thread.start()
    if victim_stage == "decode":  # every stream is past its first token
        assert all(first.wait(30) for first in firsts)
    else:  # the requests are still inside the victim's stage
        time.sleep(0.7)
    victim = next(p for p in stack.processes if p.name == victim_stage)
    victim.kill()
    begun = time.monotonic()
    for thread in threads:
        thread.join(40)
    # Every request it held ended in bounded time, well before the clients' 30 s time-out:
    # the victim's silence is noticed within 5 s, and a killed encoder's images are then
    # encoded again, one forward at a time, behind the survivor's own (6 x 1.5 s at most).
    assert time.monotonic() - begun < 25
    assert len(results) == 6 and set(results) <= {"ok", "error"}, results
    if victim_stage == "decode":
        assert "error" in results and "ok" in results, results
    else:
        assert results == ["ok"] * 6, results
    after = httpx.post(f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=30)
    assert after.status_code == 200
    # a restarted worker rejoins and serves
    module = {"encode": "encode_worker", "prefill": "prefill_worker", "decode": "decode_worker"}[
        victim_stage
    ]
    extra = {
        "encode": (),
        "prefill": ("--dedicated-mm-encoder",),
        "decode": ("--disaggregation-mode", "decode", "--dedicated-mm-encoder"),
    }
    stack.start(victim_stage, module, "--engine", "mock", *extra[victim_stage], *HOLD[victim_stage])
    wait_until(lambda: len(in_flight(stack, victim_stage)) == 2, 90)  # a cold start, loaded


def test_components_reconnect_after_nats_restarts(tmp_path: Path, tiny_model: Path) -> None:
    with NatsServer() as private:
        stack = Stack(private.url, tmp_path)
        try:
            start_topology(stack, "E/P/D")
            private.restart()
            wait_until(lambda: _ready(stack), 30)
            reply = httpx.post(
                f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=30
            )
            assert reply.status_code == 200, reply.text
        finally:
            stack.stop()


def _ready(stack: Stack) -> bool:
    try:
        ok = httpx.get(f"{stack.url}/ready", timeout=2).status_code == 200
        return (
            ok
            and httpx.post(
                f"{stack.url}/v1/chat/completions", json=body(2, stream=False), timeout=5
            ).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def test_prefill_failure_reaches_the_client_at_once(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--mock-fail-prefill")
    begun = time.monotonic()
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=30)
    # told through the room at once: a time-out would take 5 s or more (the slack is for a
    # loaded test machine; on an idle one this takes ~20 ms)
    assert time.monotonic() - begun < 3.0
    assert reply.status_code == 500
    assert "injected prefill failure" in reply.json()["error"]["message"]
    assert all(n == 0 for c in ("decode", "prefill") for n in in_flight(stack, c))


def sigterm_mid_stream(stack: Stack, name: str) -> list[str]:
    """Start a slow E/P/D stack, SIGTERM its `name` process while a stream is in flight (it
    must exit cleanly once that stream ended), and return how the stream ended."""
    start_topology(stack, "E/P/D", *SLOW)
    results: list[str] = []
    thread = threading.Thread(target=stream_outcome, args=(stack.url, results))
    thread.start()
    time.sleep(0.8)
    process = next(p for p in stack.processes if p.name == name)
    assert process.terminate(timeout=30) == 0  # it finished the request, then exited
    thread.join(30)
    return results


def test_sigterm_drains_in_flight_requests(stack: Stack) -> None:
    assert sigterm_mid_stream(stack, "decode") == ["ok"]
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=30)
    assert reply.status_code == 503  # no decode left: a clear error, no hang
    assert json.loads(reply.text)["error"]["message"] == "no live decode instance"


def test_sigterm_to_the_frontend_finishes_in_flight_requests(stack: Stack) -> None:
    assert sigterm_mid_stream(stack, "frontend") == ["ok"]
    with pytest.raises(httpx.HTTPError):  # and it no longer accepts requests
        httpx.get(f"{stack.url}/health", timeout=2)
