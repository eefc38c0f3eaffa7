"""The token path: frames on direct links from decode to the frontend, text past the encoder,
rooms chosen by decode from prefill's discovery metadata."""

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil

from tests.stack import Stack, micro_stats, start_topology
from tests.test_faults import PIXEL
from tests.test_metrics import scrape, value
from triptych.components.decode_worker.handler import DisaggregatedHandler
from triptych.components.prefill_worker.handler import PrefillHandler
from triptych.engines.mock import MockConfig, MockDecodeEngine, MockPrefillEngine, mock_tokens
from triptych.protocol import GenerateRequest, SamplingOptions, decode_chunk, local
from triptych.runtime import Context, Runtime, RuntimeConfig, Service, StreamSink
from triptych.runtime.nats_server import NatsServer
from triptych.transfer import BootstrapClient, EmbeddingTransport

MODEL = "tiny-qwen2.5-vl"


def chat(max_tokens: int, image: bool = False) -> dict[str, Any]:
    content: Any = "count to a large number please"
    if image:
        content = [
            {"type": "image_url", "image_url": {"url": PIXEL}},
            {"type": "text", "text": "what is this?"},
        ]
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
        "messages": [{"role": "user", "content": content}],
    }


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SSE event of one streamed request (``[DONE]`` left out)."""
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


async def metadata(stack: Stack, component: str) -> list[dict[str, str]]:
    nc = await nats.connect(stack.nats_url)
    inbox = nc.new_inbox()
    found: list[dict[str, str]] = []

    async def collect(msg: Any) -> None:
        found.append(json.loads(msg.data)["metadata"])

    await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.PING.{stack.namespace}-{component}", b"", reply=inbox)
    await asyncio.sleep(0.3)
    await nc.close()
    return found


def worker_metrics(
    stack: Stack, component: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    (meta,) = asyncio.run(metadata(stack, component))
    return scrape(f"http://{meta['host']}:{meta['metrics_port']}/metrics")


def test_tokens_arrive_in_order_and_complete_over_the_direct_link(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--mock-decode-s-per-step", "0.001")
    (decode,) = asyncio.run(metadata(stack, "decode"))
    assert decode["stream_port"].isdigit() and decode["host"] == "127.0.0.1"
    time.sleep(1.5)  # the frontend dials decode when discovery first sees it
    results: list[list[dict[str, Any]]] = []
    threads = [
        threading.Thread(target=lambda: results.append(stream(stack.url, chat(64))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8
    for events in results:
        deltas = [e for e in events if e["choices"]]
        ids = [i for e in deltas for i in (e["choices"][0].get("token_ids") or [])]
        assert len(ids) == 64
        assert deltas[-1]["choices"][0]["finish_reason"] == "length"
        assert len(deltas) >= 64  # one event per token (plus the role event)
    # the same prompt gives the same tokens on every stream, in the same order
    assert all(token_ids(events) == token_ids(results[0]) for events in results)
    samples = worker_metrics(stack, "decode")
    direct = value(samples, "triptych_stage_response_streams_total", stage="decode", path="direct")
    assert direct >= 8
    if local.AVAILABLE:  # one host: the links and the room connection are UNIX sockets
        (prefill,) = asyncio.run(metadata(stack, "prefill"))
        accepted = {
            "decode": {local.local_name("link", decode["host"], int(decode["stream_port"]))},
            "prefill": {
                local.local_name("link", prefill["host"], int(prefill["stream_port"])),
                local.local_name(
                    "bootstrap", prefill["bootstrap_host"], int(prefill["bootstrap_port"])
                ),
            },
        }
        for process in stack.processes:
            if process.name in accepted:
                sockets = psutil.Process(process.popen.pid).net_connections(kind="unix")
                shown = {c.laddr.replace("@", "\0", 1) for c in sockets}  # psutil's spelling
                assert accepted[process.name] <= shown, sockets


def token_ids(events: list[dict[str, Any]]) -> list[int]:
    return [i for e in events if e["choices"] for i in (e["choices"][0].get("token_ids") or [])]


def test_direct_link_and_nats_give_the_same_tokens(
    stack: Stack, nats_server: NatsServer, tmp_path: Path
) -> None:
    """--no-direct-streams sends every frame through NATS; the tokens are the same."""
    body = chat(48)
    body["seed"] = 7
    start_topology(stack, "P/D", "--mock-decode-s-per-step", "0.0005")
    time.sleep(1.5)  # linked
    direct = token_ids(stream(stack.url, body))
    samples = worker_metrics(stack, "decode")
    assert (
        value(samples, "triptych_stage_response_streams_total", stage="decode", path="direct") >= 1
    )
    by_nats = Stack(nats_server.url, tmp_path / "nats")
    (tmp_path / "nats").mkdir()
    try:
        start_topology(
            by_nats,
            "P/D",
            "--mock-decode-s-per-step",
            "0.0005",
            "--no-direct-streams",
            frontend_args=("--no-direct-streams",),
        )
        (decode,) = asyncio.run(metadata(by_nats, "decode"))
        assert "stream_port" not in decode
        assert token_ids(stream(by_nats.url, body)) == direct
        samples = worker_metrics(by_nats, "decode")
        assert (
            value(samples, "triptych_stage_response_streams_total", stage="decode", path="nats")
            >= 1
        )
        assert (
            value(samples, "triptych_stage_response_streams_total", stage="decode", path="direct")
            == 0
        )
    finally:
        by_nats.stop()
    assert len(direct) == 48


def test_decode_death_mid_stream_ends_the_stream_with_an_error_chunk(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--mock-decode-s-per-step", "0.05")
    time.sleep(1.5)  # linked
    events: list[str] = []
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=chat(200), timeout=30
    ) as reply:
        lines = reply.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        next(p for p in stack.processes if p.name == "decode").kill()
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    # the lost link failed the stream, no idle timeout needed
    assert error["code"] == 503 and "stream link was lost" in error["message"], error


def test_text_only_requests_never_reach_the_encoder(stack: Stack) -> None:
    start_topology(stack, "E/P/D")
    for _ in range(3):
        assert stream(stack.url, chat(4))
    assert [s["requests"] for s in asyncio.run(micro_stats(stack, "encode")).values()] == [0]
    encode = worker_metrics(stack, "encode")
    assert (
        value(encode, "triptych_stage_request_duration_seconds_count", stage="encode", outcome="ok")
        == 0
    )
    assert stream(stack.url, chat(4, image=True))  # with an image: through the encoder
    assert [s["requests"] for s in asyncio.run(micro_stats(stack, "encode")).values()] == [1]
    encode = worker_metrics(stack, "encode")
    assert value(encode, "triptych_encode_images_total") == 1


class _Recorder(StreamSink):
    def __init__(self) -> None:
        super().__init__(self._publish, "recorder", "r1")
        self.frames: list[bytes] = []

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.frames.append(data)


async def test_decode_chooses_the_room_and_joins_before_prefill_answers(
    nats_server: NatsServer, monkeypatch: Any
) -> None:
    """Prefill announces its bootstrap address; decode picks the room, joins it while the
    request is on its way to prefill, and never waits for prefill to name a room."""
    config = RuntimeConfig(nats_url=nats_server.url, namespace=f"room{time.monotonic_ns()}")
    events: list[str] = []
    join = BootstrapClient.join

    async def joining(self: BootstrapClient, host: str, port: int, room: int) -> Any:
        events.append("join")
        return await join(self, host, port, room)

    monkeypatch.setattr(BootstrapClient, "join", joining)
    async with Runtime(config, "prefill") as prefill_rt, Runtime(config, "decode") as decode_rt:
        prefill_engine = MockPrefillEngine(MockConfig())
        await prefill_engine.start()
        service = Service(prefill_rt, "prefill")
        service.announce(prefill_engine.bootstrap_metadata())
        prefill = PrefillHandler(prefill_engine, EmbeddingTransport(None, 5), None)
        seen: list[GenerateRequest] = []

        async def handle(request: GenerateRequest, ctx: Context) -> None:
            seen.append(request)
            events.append("prefill")
            await prefill.generate(request, ctx)

        service.add_endpoint("generate", GenerateRequest, handle)
        await service.start()
        decode_engine = MockDecodeEngine(MockConfig())
        client = await decode_rt.client("prefill")
        assert await client.instances.wait_for_any(5)
        handler = DisaggregatedHandler(decode_engine, client)
        request = GenerateRequest(
            model=MODEL, token_ids=[5, 6, 7], sampling=SamplingOptions(max_tokens=6)
        )
        sink = _Recorder()
        ctx = Context(request_id="r1", deadline=time.time() + 10, stream=sink)
        await handler.generate(request, ctx)
        await decode_engine.close()
        await service.close()
        await prefill_engine.close()
    assert seen and seen[0].bootstrap_room is not None  # decode chose the room
    assert events[:2] == ["join", "prefill"]  # and waited in it before prefill had the request
    tokens = [t for frame in sink.frames if frame for t in decode_chunk(frame).token_ids]
    assert tokens == mock_tokens(request, 256, 1024)
    assert prefill_engine.server.open_rooms == 0
