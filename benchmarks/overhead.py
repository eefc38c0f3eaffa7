"""Request-path overhead: the mock engine at zero cost, so every millisecond is triptych's own.

Starts each topology with its launch script (private nats-server, real processes), then
measures streamed, text-only chat completions of 16 output tokens: time to first token at
concurrency 1 and requests/s at concurrency 32. Client, server and NATS share the machine.

    python benchmarks/overhead.py [--out benchmarks/results/overhead_mock_cpu.json]
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import LoadConfig, machine_info, run_load

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = {"E/P/D": "multimodal_disagg.sh", "EPD (agg)": "agg.sh"}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        key: result[key]
        for key in ("concurrency", "requests", "errors", "requests_per_s", "ttft_ms", "latency_ms")
    }


async def measure(url: str, model: str, requests_c1: int, requests_c32: int) -> dict[str, Any]:
    common = {
        "url": url,
        "model": model,
        "max_tokens": 16,
        "prompt_tokens": 16,
        "stream": True,
        "ignore_eos": True,
    }
    c1 = await run_load(LoadConfig(concurrency=1, requests=requests_c1, warmup=50, **common))
    c32 = await run_load(LoadConfig(concurrency=32, requests=requests_c32, warmup=320, **common))
    return {"c1": summary(c1), "c32": summary(c32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/overhead_mock_cpu.json"))
    parser.add_argument("--requests-c1", type=int, default=1000)
    parser.add_argument("--requests-c32", type=int, default=6000)
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    for name, script in TOPOLOGIES.items():
        launcher, url = launch(script, ["--engine", "mock"], log_dir / f"overhead-{script}.log")
        try:
            results[name] = asyncio.run(
                measure(url, args.model, args.requests_c1, args.requests_c32)
            )
        finally:
            stop(launcher)
        c1, c32 = results[name]["c1"], results[name]["c32"]
        print(
            f"{name:10s} c=1 TTFT p50 {c1['ttft_ms']['p50']:.2f} ms p99 "
            f"{c1['ttft_ms']['p99']:.2f} ms | c=32 {c32['requests_per_s']:.0f} req/s "
            f"(errors {c1['errors'] + c32['errors']})"
        )
    report = {
        "benchmark": "request-path overhead, mock engine at zero cost",
        "workload": "streamed chat, text only (~16-word prompt), 16 output tokens, ignore_eos",
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
