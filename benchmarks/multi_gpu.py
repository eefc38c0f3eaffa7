"""E/P/D across GPUs against the same GPUs running independent EPD (agg) workers.

Same checkpoint as the GPU check (Qwen2.5-VL-7B-shaped, random bf16). With two GPUs: E/P/D puts
encode and prefill on GPU 0 and decode on GPU 1; the baseline runs one EPD worker per GPU.
Open-loop load (Poisson arrivals) at increasing request rates, for a one-image mix (448x448 +
short text) and a vision-heavy mix (three 1024x1024 images). Records throughput, TTFT p50/p99,
the logged embedding and KV transfer times, and the GPU-to-GPU copy bandwidth.

    python benchmarks/multi_gpu.py --out DIR [--rates 0.5,1,2] [--seconds 15]
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import chat_body, picture, stream_chat
from gpu_epd import build_checkpoint, transfer_times
from launcher import launch, stop
from load import utc_now

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = {
    "E/P/D (E+P: GPU0, D: GPU1)": [
        "multimodal_disagg.sh",
        "--encode-gpu",
        "0",
        "--prefill-gpu",
        "0",
        "--decode-gpu",
        "1",
    ],
    "2x EPD (GPU0, GPU1)": ["agg.sh", "--gpus", "0,1"],
}


def peer_bandwidth() -> float | None:
    """cuda:0 → cuda:1 copy, bytes per second."""
    if torch.cuda.device_count() < 2:
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    started = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return 10 * a.numel() / (time.perf_counter() - started)


async def timed_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    try:
        streamed = await stream_chat(client, body)
    except httpx.HTTPStatusError:
        return {"error": 1.0}
    return {
        "ttft_s": streamed.ttft_s,
        "latency_s": streamed.end - streamed.start,
        "tokens": streamed.tokens,
    }


async def sweep(
    url: str, model: str, images: list[str], rates: list[float], seconds: float, max_tokens: int
) -> list[dict[str, Any]]:
    text = (
        "Describe these pictures in detail, noting colours, shapes, textures and anything "
        "unusual about them."
    )
    body = chat_body(model, images, text, max_tokens)
    rows = []
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await timed_request(client, {**body, "max_tokens": 4})  # warm-up
        for rate in rates:
            tasks = []
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                tasks.append(asyncio.create_task(timed_request(client, body)))
                await asyncio.sleep(rng.expovariate(rate))
            done, pending = await asyncio.wait(tasks, timeout=45)
            for task in pending:
                task.cancel()
            elapsed = time.perf_counter() - started
            ok = [t.result() for t in done if not t.exception() and "error" not in t.result()]
            ttfts = sorted(r["ttft_s"] * 1e3 for r in ok)
            rows.append(
                {
                    "rate_req_per_s": rate,
                    "sent": len(tasks),
                    "completed": len(ok),
                    "errors": len(tasks) - len(ok),
                    "throughput_req_per_s": len(ok) / elapsed,
                    "output_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
                    "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
                    "ttft_ms_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
                    if ttfts
                    else None,
                }
            )
            print(f"  rate {rate}: {rows[-1]}", flush=True)
    return rows


def run_topology(
    name: str,
    script: list[str],
    checkpoint: Path,
    out: Path,
    mixes: dict[str, list[str]],
    rates: list[float],
    seconds: float,
    max_tokens: int,
) -> dict[str, Any]:
    log = out / f"multi_gpu_{script[0].removesuffix('.sh')}.log"
    begun = time.perf_counter()
    launcher, url = launch(
        script[0],
        [
            *script[1:],
            "--engine",
            "hf",
            "--device",
            "cuda",
            "--model-path",
            str(checkpoint),
            "--",
            "--transfer-pool-mb",
            "2048",
        ],
        log,
    )
    try:
        print(f"{name}: ready in {time.perf_counter() - begun:.0f}s", flush=True)
        result: dict[str, Any] = {"ready_s": time.perf_counter() - begun}
        for mix, images in mixes.items():
            result[mix] = asyncio.run(
                sweep(url, checkpoint.name, images, rates, seconds, max_tokens)
            )
    finally:
        stop(launcher)
    result["transfers"] = transfer_times(log.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/triptych-7b-random"))
    parser.add_argument("--rates", default="0.5,1,2")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mixes", default="one_448_image,three_1024_images")
    parser.add_argument("--report", default="multi_gpu.json")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    checkpoint = build_checkpoint(args.checkpoint, args.shape, "cuda")
    every_mix = {"one_448_image": [picture(448)], "three_1024_images": [picture(1024)] * 3}
    mixes = {name: every_mix[name] for name in args.mixes.split(",")}
    report: dict[str, Any] = {
        "benchmark": "E/P/D across GPUs vs independent EPD workers on the same GPUs",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "gpu_to_gpu_copy_bytes_per_s": peer_bandwidth(),
        "timestamp": utc_now(),
        "max_tokens": args.max_tokens,
        "seconds_per_rate": args.seconds,
        "results": {},
    }
    for name, script in TOPOLOGIES.items():
        report["results"][name] = run_topology(
            name, script, checkpoint, args.out, mixes, rates, args.seconds, args.max_tokens
        )
        (args.out / args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))


if __name__ == "__main__":
    main()
