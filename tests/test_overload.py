"""Overload and faults: full queues answer 503 with Retry-After at once, a request whose instance
dies before its first token migrates, queued embeddings never expire, and nothing outlives its
launcher."""

import base64
import io
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.stack import ROOT, Stack, start_topology
from tests.test_faults import body, in_flight, wait_until
from triptych.runtime.entry import EXIT_NATS_LOST
from triptych.runtime.nats_server import NatsServer
from triptych.runtime.port_file import read_port_file

SLOW_DECODE = ("--mock-decode-s-per-step", "0.05")


def hold_streams(url: str, count: int, max_tokens: int = 200) -> list[threading.Thread]:
    """`count` streaming requests that each take a while; their threads."""

    def run() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body(max_tokens), timeout=60
        ) as reply:
            for _ in reply.iter_lines():
                pass

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_a_full_frontend_answers_503_with_retry_after_at_once(stack: Stack) -> None:
    start_topology(stack, "E/P/D", *SLOW_DECODE, frontend_args=("--max-inflight-requests", "2"))
    held = hold_streams(stack.url, 2)
    wait_until(lambda: in_flight(stack, "decode") == [2], 10)
    times = []
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        client.get("/health")  # connected before timing
        for _ in range(5):
            begun = time.monotonic()
            reply = client.post("/v1/chat/completions", json=body(5, stream=False))
            times.append(time.monotonic() - begun)
            assert reply.status_code == 503
            assert reply.headers["Retry-After"] == "1"
            assert "--max-inflight-requests 2" in reply.json()["error"]["message"]
    # refused on arrival, before any parsing or worker (the least of five: a loaded test
    # machine may stall any single request)
    assert min(times) < 0.1, times
    for thread in held:
        thread.join(30)
    after = httpx.post(f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=30)
    assert after.status_code == 200  # room again once they finished


def test_full_worker_queues_answer_503_with_retry_after(stack: Stack, tmp_path: Path) -> None:
    """Decode runs one request and queues one. The frontend that holds them refuses a third at
    its door (it knows decode's capacity); a second frontend, which holds none, passes it on,
    and the decode instance refuses it as busy."""
    limits = ("--max-running-requests", "1", "--max-queued-requests", "1")
    start_topology(stack, "E/P/D", *SLOW_DECODE, *limits)
    other = tmp_path / "second-frontend.port"
    stack.start(
        "frontend", "frontend", "--topology", "E/P/D", "--http-port", "0", "--port-file", str(other)
    )
    wait_until(other.exists, 120)
    ports = read_port_file(other)
    assert ports is not None
    second = f"http://127.0.0.1:{ports['http']}"
    wait_until(lambda: httpx.get(f"{second}/ready", timeout=5).status_code == 200, 60)
    held = hold_streams(stack.url, 2, max_tokens=100)
    wait_until(lambda: in_flight(stack, "decode") == [2], 10)
    at_the_door = httpx.post(
        f"{stack.url}/v1/chat/completions", json=body(5, stream=False), timeout=10
    )
    assert at_the_door.status_code == 503
    assert at_the_door.headers["Retry-After"] == "1"
    assert "every decode instance is full" in at_the_door.json()["error"]["message"]
    for stream in (False, True):
        begun = time.monotonic()
        reply = httpx.post(f"{second}/v1/chat/completions", json=body(5, stream=stream), timeout=10)
        assert reply.status_code == 503, reply.text  # streamed too: nothing was sent yet
        assert reply.headers["Retry-After"] == "1"
        assert reply.json()["error"]["message"] == "every decode instance is busy"
        assert time.monotonic() - begun < 1.0  # no time-out involved (~5 ms when idle)
    metrics = httpx.get(f"{second}/metrics", timeout=5).text
    assert 'triptych_frontend_rejected_total{reason="workers_full"} 2.0' in metrics
    for thread in held:
        thread.join(30)
    assert in_flight(stack, "decode") == [0]


def _answer(stack: Stack) -> dict[str, object]:
    """A whole answer of 8 tokens (ids included), less its timestamp."""
    reply = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={**body(8, stream=False), "return_token_ids": True},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return {k: v for k, v in reply.json().items() if k != "created"}


def _migrations(stack: Stack) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=5).text
    return float(re.findall(r"^triptych_frontend_migrations_total (\S+)$", text, re.M)[0])


def _start_later(stack: Stack, stage: str, *flags: str) -> None:
    """Another instance of `stage`, once every caller's discovery has seen it."""
    args = {
        "decode": ("decode_worker", "--disaggregation-mode", "decode", "--dedicated-mm-encoder"),
        "prefill": ("prefill_worker", "--dedicated-mm-encoder"),
    }[stage]
    stack.start(stage, args[0], "--engine", "mock", *args[1:], *flags)
    wait_until(lambda: len(in_flight(stack, stage)) == 2, 60)
    time.sleep(1.5)  # discovery pings every second


def test_a_request_queued_on_a_decode_that_dies_migrates(stack: Stack) -> None:
    """Decode runs one request and queues the next; it dies. The running request had tokens
    and fails; the queued one had none: it moves to another decode and answers normally."""
    start_topology(stack, "E/P/D", *SLOW_DECODE, "--max-running-requests", "1")
    outcomes: list[object] = []
    streaming = threading.Thread(target=lambda: outcomes.append(_stream_status(stack, 1000)))
    streaming.start()
    wait_until(lambda: in_flight(stack, "decode") == [1], 30)
    queued: list[dict[str, object]] = []
    waiting = threading.Thread(target=lambda: queued.append(_answer(stack)))
    waiting.start()
    wait_until(lambda: in_flight(stack, "decode") == [2], 30)
    victim = next(p for p in stack.processes if p.name == "decode")
    _start_later(stack, "decode", *SLOW_DECODE)
    victim.kill()
    streaming.join(60)
    waiting.join(60)
    assert outcomes == ["error"]  # it was past its first token: the stream ends in an error
    assert len(queued) == 1 and queued[0] == _answer(stack) | {"id": queued[0]["id"]}
    assert _migrations(stack) == 1


def test_a_request_whose_prefill_dies_mid_prefill_migrates(stack: Stack) -> None:
    """Prefill takes long over a request and dies; the request is sent again, reaches the
    other prefill instance, and the client sees a normal answer."""
    start_topology(stack, "E/P/D", "--mock-prefill-s-per-token", "1.0")  # ~20 s per prompt
    answers: list[dict[str, object]] = []
    thread = threading.Thread(target=lambda: answers.append(_answer(stack)))
    thread.start()
    wait_until(lambda: in_flight(stack, "prefill") == [1], 30)
    victim = next(p for p in stack.processes if p.name == "prefill")
    _start_later(stack, "prefill")  # a fast one
    victim.kill()
    thread.join(60)
    assert len(answers) == 1
    assert answers[0] == _answer(stack) | {"id": answers[0]["id"]}  # same tokens, same usage
    assert _migrations(stack) == 1
    wait_until(lambda: in_flight(stack, "prefill") == [0], 10)


def _stream_status(stack: Stack, max_tokens: int) -> str:
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body(max_tokens), timeout=60
    ) as reply:
        last = [line for line in reply.iter_lines() if line.startswith("data: ")][-2]
    return "error" if '"error"' in last else "ok"


def _png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_embeddings_of_a_request_queued_past_the_old_lease_still_arrive(
    stack: Stack, tiny_model: Path
) -> None:
    """E/PD on the real engine: one KV slot, held by a long request; an image request waits
    behind it for longer than embeddings used to be kept (twice the read timeout, 2 s here),
    and its embeddings are still there when its turn comes."""
    start_topology(
        stack,
        "E/PD",
        "--max-running-requests",
        "1",
        "--transfer-timeout-s",
        "1",
        engine="hf",
        model_path=str(tiny_model),
    )
    long = {**body(4000, stream=False), "ignore_eos": True, "model": tiny_model.name}
    first = threading.Thread(
        target=lambda: httpx.post(f"{stack.url}/v1/chat/completions", json=long, timeout=120)
    )
    first.start()
    wait_until(lambda: in_flight(stack, "decode") == [1], 30)
    image_request = {
        "model": tiny_model.name,
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png(56)}},
                    {"type": "text", "text": "what is it?"},
                ],
            }
        ],
    }
    begun = time.monotonic()
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=image_request, timeout=120)
    waited = time.monotonic() - begun
    first.join(120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    assert waited > 2.5, f"queued only {waited:.1f}s: the test proves nothing"


SERVING = re.compile(r"triptych is serving on (http://127\.0\.0\.1:[0-9]+) ")


@pytest.mark.parametrize(
    "script", ["multimodal_disagg.sh", "multimodal_epd.sh", "agg.sh", "disagg.sh"]
)
def test_sigkill_of_a_launcher_leaves_no_process(script: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    log = tmp_path / "launch.log"
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "launch" / script), "--engine", "mock", "--http-port", "0"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until(lambda: SERVING.search(log.read_text()) is not None, 120)
        started = psutil.Process(launcher.pid).children(recursive=True)
        pids = {p.pid for p in started if "triptych" in " ".join(p.cmdline()) or "nats" in p.name()}
        assert len(pids) >= 3, [p.cmdline() for p in started]
        launcher.send_signal(signal.SIGKILL)  # no trap runs: nothing of its own cleans up
        launcher.wait(5)
        wait_until(lambda: not [pid for pid in pids if _alive(pid)], 10)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_exits_non_zero_when_nats_stays_gone(tmp_path: Path) -> None:
    with NatsServer() as private:
        stack = Stack(private.url, tmp_path)
        worker = stack.start(
            "decode",
            "decode_worker",
            "--engine",
            "mock",
            "--nats-reconnect-window-s",
            "2",
            "--port-file",
            str(tmp_path / "decode.port"),
        )
        try:
            wait_until((tmp_path / "decode.port").exists, 60)
            private.stop()
            assert worker.popen.wait(30) == EXIT_NATS_LOST
            assert "could not reach NATS for 2s" in worker.output()
        finally:
            stack.stop()
