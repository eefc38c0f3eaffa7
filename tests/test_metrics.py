"""Metrics move as requests flow: scrape before and after, on the frontend and every worker."""

import asyncio
import base64
import io
import json
import time
from typing import Any

import httpx
import nats
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import Stack, start_topology


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def metrics_ports(stack: Stack, component: str) -> list[int]:
    nc = await nats.connect(stack.nats_url)
    inbox = nc.new_inbox()
    ports: list[int] = []

    async def collect(msg: Any) -> None:
        ports.append(int(json.loads(msg.data)["metadata"]["metrics_port"]))

    await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.PING.{stack.namespace}-{component}", b"", reply=inbox)
    await asyncio.sleep(0.3)
    await nc.close()
    return ports


def chat(stream: bool, image: bool = False) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "measure me"}]
    if image:
        buffer = io.BytesIO()
        Image.new("RGB", (56, 56), (1, 2, 3)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": 8,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }


def test_metrics_move_as_requests_flow(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--mock-decode-s-per-step", "0.01")
    frontend = f"{stack.url}/metrics"
    workers = {c: asyncio.run(metrics_ports(stack, c))[0] for c in ("encode", "prefill", "decode")}
    before = scrape(frontend)
    before_workers = {c: scrape(f"http://127.0.0.1:{p}/metrics") for c, p in workers.items()}
    for stream, image in [(True, False), (False, True), (True, True)]:
        assert (
            httpx.post(
                f"{stack.url}/v1/chat/completions", json=chat(stream, image), timeout=30
            ).status_code
            == 200
        )
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        json={**chat(True), "max_tokens": 200},
        timeout=30,
    ) as reply:
        next(reply.iter_lines())  # hang up after the first line
    httpx.post(f"{stack.url}/v1/chat/completions", content=b"{", timeout=30)
    after = scrape(frontend)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) >= by, name

    grew("triptych_frontend_requests_total", 3, endpoint="/v1/chat/completions", status="200")
    grew("triptych_frontend_requests_total", 1, endpoint="/v1/chat/completions", status="400")
    grew("triptych_frontend_time_to_first_token_seconds_count", 3)
    grew("triptych_frontend_inter_token_latency_seconds_count", 3)
    grew("triptych_frontend_request_duration_seconds_count", 4)
    grew("triptych_frontend_input_tokens_total", 30)
    grew("triptych_frontend_output_tokens_total", 24)
    grew("triptych_frontend_images_per_request_sum", 2)
    grew("triptych_frontend_image_tokens_per_request_sum", 8)
    grew("triptych_frontend_image_decode_seconds_count", 2)
    grew("triptych_frontend_image_decode_seconds_sum", 1e-6)  # CPU time, never zero
    grew("triptych_frontend_client_disconnects_total", 1)
    assert value(after, "triptych_frontend_requests_in_flight") == 0

    for component, port in workers.items():
        worker = scrape(f"http://127.0.0.1:{port}/metrics")
        count = "triptych_stage_request_duration_seconds_count"
        assert (
            value(worker, count, stage=component, outcome="ok")
            - value(before_workers[component], count, stage=component, outcome="ok")
            >= (2 if component == "encode" else 3)  # text-only requests skip the encoder
        ), component
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    encode = scrape(f"http://127.0.0.1:{workers['encode']}/metrics")
    assert value(encode, "triptych_encode_images_total") >= 2
    for component, port in workers.items():  # the hang-up freed every stage, soon
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            held = value(scrape(url), "triptych_stage_requests_in_flight", stage=component)
            if held == 0:
                break
            time.sleep(0.05)
        assert held == 0, component


def test_dashboard_uses_only_defined_metrics() -> None:
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    import triptych.observability.metrics  # noqa: F401 - registers every metric

    defined = {metric.name for metric in REGISTRY.collect() if metric.name.startswith("triptych")}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/triptych.json").read_text())
    used = {
        re.sub(r"_(bucket|count|sum|total)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"triptych_[a-z_]+", target["expr"])
    }
    assert used and used <= {re.sub(r"_total$", "", name) for name in defined}, used - defined


def test_engine_and_transfer_metrics_move_on_the_hf_engine(stack: Stack) -> None:
    start_topology(stack, "E/P/D", engine="hf")
    workers = {c: asyncio.run(metrics_ports(stack, c))[0] for c in ("encode", "prefill", "decode")}

    def samples(component: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(f"http://127.0.0.1:{workers[component]}/metrics")

    before = {c: samples(c) for c in workers}
    for _ in range(2):
        assert (
            httpx.post(
                f"{stack.url}/v1/chat/completions",
                json={**chat(False, True), "ignore_eos": True},
                timeout=60,
            ).status_code
            == 200
        )
    after = {c: samples(c) for c in workers}

    def grew(component: str, name: str, **labels: str) -> float:
        return value(after[component], name, **labels) - value(before[component], name, **labels)

    assert grew("encode", "triptych_encode_batch_size_count") >= 1
    assert grew("encode", "triptych_encode_duration_seconds_count") >= 1
    assert grew("prefill", "triptych_transfer_bytes_total", kind="embedding", outcome="ok") > 0
    assert grew("prefill", "triptych_engine_tokens_total", stage="prefill", phase="prefill") > 20
    assert grew("decode", "triptych_transfer_bytes_total", kind="kv", outcome="ok") > 0
    assert grew("decode", "triptych_engine_tokens_total", stage="decode", phase="decode") >= 16
    assert grew("decode", "triptych_engine_batch_size_count", stage="decode") >= 8
    for component in workers:  # idle again: nothing queued, running or held
        assert value(after[component], "triptych_stage_requests_in_flight", stage=component) == 0
    assert value(after["decode"], "triptych_engine_running_requests", stage="decode") == 0
    assert value(after["decode"], "triptych_engine_kv_cache_bytes", stage="decode") == 0
    assert value(after["decode"], "triptych_engine_queue_depth", stage="decode") == 0
