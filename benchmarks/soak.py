"""Soak: mixed load against E/P/D on the hf engine for a long while, on CPU.

Text, one image and three images, with some clients hanging up early; records requests
completed, errors (none expected besides the hang-ups, which are not errors), latency
percentiles, and each process's resident memory at start and end.

    python benchmarks/soak.py [--seconds 600] [--concurrency 4] [--out FILE]
"""

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import report_header

ROOT = Path(__file__).resolve().parents[1]


def picture(width: int, height: int, seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([(rng.randrange(256),) * 3 for _ in range(width * height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_for(kind: str, rng: random.Random) -> dict[str, Any]:
    text = {"type": "text", "text": f"Describe item {rng.randrange(10**6)} in detail."}
    images = {
        "text": [],
        "one image": [(84, 56)],
        "three images": [(56, 56), (140, 84), (70, 126)],
    }[kind]
    content = [
        {"type": "image_url", "image_url": {"url": picture(w, h, rng.randrange(99))}}
        for w, h in images
    ] + [text]
    return {
        "model": "tiny-qwen2.5-vl",
        "stream": True,
        "max_tokens": rng.randrange(8, 48),
        "messages": [{"role": "user", "content": content}],
    }


def rss(processes: list[psutil.Process]) -> dict[str, int]:
    sizes = {}
    for process in processes:
        try:
            line = " ".join(process.cmdline())
            name = (
                line.split("triptych.components.")[1].split()[0]
                if "components." in line
                else "nats-server"
            )
            sizes[f"{name}:{process.pid}"] = process.memory_info().rss
        except (psutil.Error, IndexError):
            continue
    return sizes


async def client(url: str, deadline: float, seed: int, stats: dict[str, Any]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            kind = rng.choice(["text", "one image", "three images"])
            hang_up = rng.random() < 0.1
            body = request_for(kind, rng)
            started = time.perf_counter()
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                    if reply.status_code != 200:
                        stats["errors"].append(f"HTTP {reply.status_code}")
                        continue
                    lines = 0
                    finished = False
                    async for line in reply.aiter_lines():
                        lines += 1
                        if '"error"' in line:
                            stats["errors"].append(line[:200])
                        if line == "data: [DONE]":
                            finished = True
                        if hang_up and lines >= 3:
                            break
                if hang_up:
                    stats["hung_up"] += 1
                elif finished:
                    stats["latency"][kind].append(time.perf_counter() - started)
                else:
                    stats["errors"].append("stream ended without [DONE]")
            except httpx.HTTPError as error:
                stats["errors"].append(f"{type(error).__name__}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak_cpu.json")
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "soak-launch.log"
    launcher, url = launch("multimodal_disagg.sh", ["--engine", "hf"], log)
    try:
        processes = psutil.Process(launcher.pid).children(recursive=True)
        stats: dict[str, Any] = {
            "errors": [],
            "hung_up": 0,
            "latency": {"text": [], "one image": [], "three images": []},
        }
        warm_up: dict[str, Any] = {
            "errors": [],
            "hung_up": 0,
            "latency": {"text": [], "one image": [], "three images": []},
        }
        asyncio.run(client(url, time.monotonic() + 20, 99, warm_up))
        rss_start = rss(processes)
        began = time.monotonic()

        async def load() -> None:
            end = time.monotonic() + args.seconds
            await asyncio.gather(
                *(client(url, end, seed, stats) for seed in range(args.concurrency))
            )

        asyncio.run(load())
        elapsed = time.monotonic() - began
        rss_end = rss(processes)
    finally:
        stop(launcher)

    def percentiles(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        if not ordered:
            return {}
        return {
            "p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        }

    completed = sum(len(v) for v in stats["latency"].values())
    report = {
        **report_header(
            "soak: E/P/D, hf engine, tiny Qwen2.5-VL, mixed text/1/3 images, "
            "10% of clients hang up early"
        ),
        "seconds": elapsed,
        "concurrency": args.concurrency,
        "requests_completed": completed,
        "hung_up_on_purpose": stats["hung_up"],
        "errors": len(stats["errors"]),
        "error_samples": stats["errors"][:10],
        "latency": {
            kind: {"count": len(v), **percentiles(v)} for kind, v in stats["latency"].items()
        },
        "latency_all": percentiles([x for v in stats["latency"].values() for x in v]),
        "rss_bytes_start": rss_start,
        "rss_bytes_end": rss_end,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
