"""Overload: E/P/D on the mock engine at realistic costs, offered 4x what it can serve.

The engine is the bottleneck, as a GPU is in production: the mock decodes 16 sequences at a
time at 50 ms a step, far below what this machine's CPUs can stream. First the capacity is
measured (a closed loop of as many clients as decode runs at once). Then requests arrive
open-loop, Poisson, at `--factor` times that rate for `--seconds`.
What should hold: only 200s and 503s (each 503 with ``Retry-After``, answered at once), the
p99 latency of admitted requests bounded by the queue, and every process's resident memory flat.

    python benchmarks/overload.py [--seconds 120] [--factor 4] [--out FILE]
"""

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import LoadConfig, _summary_ms, build_body, report_header, run_load

ROOT = Path(__file__).resolve().parents[1]
# Per stage: encode 20 ms an image, prefill 0.2 ms a token, decode 50 ms a step (all running
# sequences together), 16 sequences per decode instance and 64 more queued.
RUNNING = 16
COSTS = [
    "--mock-encode-s-per-image",
    "0.02",
    "--mock-prefill-s-per-token",
    "0.0002",
    "--mock-decode-s-per-step",
    "0.05",
    "--max-running-requests",
    str(RUNNING),
    "--max-queued-requests",
    "64",
]
MAX_TOKENS = 32


@dataclass
class Outcome:
    status: int
    seconds: float
    retry_after: str | None = None
    complete: bool = False


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> Outcome:
    begun = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
            return Outcome(
                r.status,
                time.perf_counter() - begun,
                r.headers.get("Retry-After"),
                r.status == 200 and data.rstrip().endswith(b"data: [DONE]"),
            )
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(0, time.perf_counter() - begun)


def rss(processes: list[psutil.Process]) -> dict[str, int]:
    sizes = {}
    for process in processes:
        try:
            line = " ".join(process.cmdline())
            name = line.split("components.")[1].split()[0] if "components." in line else "nats"
            sizes[f"{name}:{process.pid}"] = process.memory_info().rss
        except (psutil.Error, IndexError):
            continue
    return sizes


async def offer(url: str, body: bytes, rate: float, seconds: float, sample: Any) -> list[Outcome]:
    """Poisson arrivals at `rate` per second for `seconds`; `sample()` every 10 s."""
    rng = random.Random(7)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=300)
    outcomes: list[Outcome] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: set[asyncio.Task[None]] = set()

        async def run() -> None:
            outcomes.append(await one(session, url, body))

        begun = time.perf_counter()
        arrival, next_sample = begun, begun + 10
        while arrival < begun + seconds:
            arrival += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            task = asyncio.create_task(run())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if time.perf_counter() >= next_sample:
                sample()
                next_sample += 10
        await asyncio.gather(*tasks)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/overload_mock_cpu.json"
    )
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "overload-launch.log"
    launcher, url = launch("multimodal_disagg.sh", ["--engine", "mock", "--", *COSTS], log)
    samples: list[dict[str, int]] = []
    try:
        processes = psutil.Process(launcher.pid).children(recursive=True)
        model = "tiny-qwen2.5-vl"
        capacity = asyncio.run(
            run_load(
                LoadConfig(
                    url=url,
                    model=model,
                    concurrency=RUNNING,
                    duration=20,
                    warmup=32,
                    max_tokens=MAX_TOKENS,
                    label="capacity",
                )
            )
        )
        rate = args.factor * capacity["requests_per_s"]
        print(f"capacity {capacity['requests_per_s']:.1f} req/s; offering {rate:.1f} req/s")
        samples.append(rss(processes))
        body = build_body(LoadConfig(model=model, max_tokens=MAX_TOKENS))
        began = time.perf_counter()
        outcomes = asyncio.run(
            offer(
                f"{url}/v1/chat/completions",
                body,
                rate,
                args.seconds,
                lambda: samples.append(rss(processes)),
            )
        )
        elapsed = time.perf_counter() - began
        samples.append(rss(processes))
    finally:
        stop(launcher)

    statuses: dict[str, int] = {}
    for outcome in outcomes:
        statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
    admitted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]

    def growth(first: dict[str, int]) -> dict[str, float]:
        last = samples[-1]
        return {name: last[name] / size - 1 for name, size in first.items() if name in last}

    # steady state: from the first sample under overload (queues full) to the last
    steady = growth(samples[1] if len(samples) > 2 else samples[0])
    report = {
        **report_header(
            "overload: E/P/D, mock engine at realistic costs, open-loop Poisson "
            f"arrivals at {args.factor:g}x the measured capacity"
        ),
        "mock_costs": COSTS,
        "max_tokens": MAX_TOKENS,
        "capacity_requests_per_s": capacity["requests_per_s"],
        "offered_requests_per_s": rate,
        "seconds": elapsed,
        "requests": len(outcomes),
        "status_counts": dict(sorted(statuses.items())),
        "only_200_and_503": set(statuses) <= {"200", "503"},
        "admitted_complete": sum(o.complete for o in admitted),
        "admitted_per_s": len(admitted) / elapsed,
        "admitted_latency_ms": _summary_ms([o.seconds for o in admitted]),
        "refused_with_retry_after": sum(o.retry_after is not None for o in refused),
        "refusal_latency_ms": _summary_ms([o.seconds for o in refused]),
        "rss_bytes": samples,
        "rss_growth_under_overload": steady,
        "rss_growth_under_overload_max": max(steady.values()) if steady else None,
        "rss_growth_from_before_overload": growth(samples[0]),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in report.items() if k not in ("machine", "rss_bytes")}, indent=1)
    )


if __name__ == "__main__":
    main()
