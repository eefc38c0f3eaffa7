"""Repeated images: the embedding cache off, on with round-robin, on with affinity routing.

A Zipf draw (exponent `--zipf`) from 50 distinct images, sent by `--concurrency` clients to an
E/P/D cluster with two encode workers. Each of the three settings gets a fresh cluster (cold
caches) and the same request sequence. Reported per setting: the encoders' hit ratio, vision
forwards (images through the tower, from the encoders' ``triptych_encode_batch_size`` sum),
TTFT p50/p99 and throughput.

    .venv/bin/python -m benchmarks.encode_cache [--engine mock|hf] [--requests 400]
"""

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import _summary_ms, machine_info
from triptych.runtime.nats_server import NatsServer
from triptych.runtime.port_file import read_port_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "cache off": (["--embedding-cache-bytes", "0"], "round-robin"),
    "cache on, round-robin": ([], "round-robin"),
    "cache on, affinity": ([], "affinity"),
}


def images(count: int, side: int) -> list[str]:
    """`count` distinct noisy PNGs as data URLs."""
    urls = []
    for seed in range(count):
        rng = random.Random(seed)
        picture = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def zipf_draw(count: int, items: int, exponent: float, seed: int) -> list[int]:
    """`count` indices into `items`, index k drawn with weight 1 / (k + 1) ** exponent."""
    weights = [1.0 / (k + 1) ** exponent for k in range(items)]
    return random.Random(seed).choices(range(items), weights=weights, k=count)


class Cluster:
    """One E/P/D cluster: `encoders` encode workers, one prefill, one decode, a frontend."""

    def __init__(self, nats_url: str, tmp: Path, name: str) -> None:
        self.nats_url = nats_url
        self.tmp = tmp
        self.namespace = f"bench{time.monotonic_ns()}"
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []
        self.encode_ports: list[Path] = []

    def _start(self, label: str, module: str, *args: str) -> None:
        env = dict(os.environ)
        env.update(NATS_URL=self.nats_url, TRIPTYCH_NAMESPACE=self.namespace, PYTHONUNBUFFERED="1")
        log = self.tmp / f"{self.name}-{label}-{len(self.processes)}.log"
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", f"triptych.components.{module}", *args],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        )

    def start(self, engine: list[str], cache: list[str], routing: str, encoders: int) -> str:
        for index in range(encoders):
            port_file = self.tmp / f"{self.name}-encode-{index}.port"
            self.encode_ports.append(port_file)
            self._start("encode", "encode_worker", *engine, *cache, "--port-file", str(port_file))
        self._start("prefill", "prefill_worker", "--dedicated-mm-encoder", *engine)
        self._start(
            "decode",
            "decode_worker",
            "--disaggregation-mode",
            "decode",
            "--dedicated-mm-encoder",
            *engine,
        )
        model = [a for i, a in enumerate(engine) if i and engine[i - 1] == "--model-path"]
        port_file = self.tmp / f"{self.name}-frontend.port"
        self._start(
            "frontend",
            "frontend",
            "--http-port",
            "0",
            "--port-file",
            str(port_file),
            "--image-routing",
            routing,
            *(["--model-path", model[0]] if model else []),
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ports = read_port_file(port_file)
            if ports is not None:
                url = f"http://127.0.0.1:{ports['http']}"
                try:
                    ready = httpx.get(f"{url}/ready", timeout=2).json()
                    if ready["instances"].get("encode") == encoders and ready["status"] == "ready":
                        time.sleep(2.5)  # a discovery round: the frontend routes over both
                        return url
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: cluster not ready (logs in {self.tmp})")

    def encode_metrics(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for port_file in self.encode_ports:
            ports = read_port_file(port_file)
            assert ports is not None
            text = httpx.get(f"http://127.0.0.1:{ports['status']}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("triptych_encode_"):
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def one(
    session: aiohttp.ClientSession, url: str, image: str, max_tokens: int, model: str
) -> tuple[float | None, bool]:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "Describe the picture."},
                ],
            }
        ],
    }
    started = time.perf_counter()
    ttft = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
        if reply.status != 200:
            await reply.read()
            return None, False
        async for line in reply.content:
            if ttft is None and line.startswith(b"data: {") and b'"content"' in line:
                ttft = time.perf_counter() - started
    return ttft, ttft is not None


async def drive(
    url: str, urls: list[str], draw: list[int], concurrency: int, max_tokens: int
) -> tuple[list[float], int, float]:
    queue = list(draw)
    ttfts: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/v1/models") as listing:
            model = (await listing.json())["data"][0]["id"]

        async def client() -> None:
            nonlocal errors
            while queue:
                index = queue.pop(0)
                ttft, ok = await one(session, url, urls[index], max_tokens, model)
                if ok and ttft is not None:
                    ttfts.append(ttft)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return ttfts, errors, elapsed


def run_setting(
    nats_url: str, tmp: Path, name: str, args: argparse.Namespace, urls: list[str], draw: list[int]
) -> dict[str, Any]:
    cache, routing = SETTINGS[name]
    engine = ["--engine", args.engine]
    if args.engine == "mock":
        engine += [
            "--mock-encode-s-per-image",
            str(args.mock_encode_s),
            "--mock-decode-s-per-step",
            str(args.mock_decode_s),
        ]
    elif args.model_path:
        engine += ["--model-path", args.model_path]
    cluster = Cluster(nats_url, tmp, name.replace(" ", "_").replace(",", ""))
    try:
        url = cluster.start(engine, cache, routing, args.encoders)
        warm = asyncio.run(drive(url, urls[:1], [0], 1, args.max_tokens))  # first-call costs
        before = cluster.encode_metrics()
        ttfts, errors, elapsed = asyncio.run(
            drive(url, urls, draw, args.concurrency, args.max_tokens)
        )
        after = cluster.encode_metrics()
    finally:
        cluster.stop()
    del warm

    def delta(metric: str) -> float:
        return after.get(metric, 0.0) - before.get(metric, 0.0)

    hits, misses = (
        delta("triptych_encode_cache_hits_total"),
        delta("triptych_encode_cache_misses_total"),
    )
    return {
        "setting": name,
        "image_routing": routing,
        "cache": not cache,
        "requests": len(draw),
        "errors": errors,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "cache_hits": hits,
        "cache_misses": misses,
        "vision_forwards": delta("triptych_encode_batch_size_count"),
        "images_through_vision_tower": delta("triptych_encode_batch_size_sum"),
        "ttft_ms": _summary_ms(ttfts),
        "requests_per_s": len(ttfts) / elapsed if elapsed else 0.0,
    }


def chart(result: dict[str, Any], path: Path) -> bool:
    """Bars: TTFT p50/p99 and images through the tower per setting (False: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = result["runs"]
    names = [run["setting"] for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(runs))
    left.bar([x - 0.2 for x in xs], [r["ttft_ms"]["p50"] for r in runs], 0.4, label="p50")
    left.bar([x + 0.2 for x in xs], [r["ttft_ms"]["p99"] for r in runs], 0.4, label="p99")
    left.set_xticks(list(xs), names, fontsize=8)
    left.set_ylabel("TTFT (ms)")
    left.legend()
    right.bar(list(xs), [r["images_through_vision_tower"] for r in runs], 0.5)
    for x, run in zip(xs, runs, strict=True):
        right.annotate(
            f"hit {run['hit_ratio']:.0%}",
            (x, run["images_through_vision_tower"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_xticks(list(xs), names, fontsize=8)
    right.set_ylabel(f"images through the vision tower (of {runs[0]['requests']})")
    config = result["config"]
    figure.suptitle(
        f"Zipf({config['zipf']}) over {config['images']} images, {config['encoders']} encoders, "
        f"{config['engine']} engine, c={config['concurrency']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("mock", "hf"), default="mock")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--image-side", type=int, default=224)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--encoders", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--mock-encode-s",
        type=float,
        default=0.05,
        help="mock vision-tower cost per image (a 7B tower on a 448x448 image on one GPU is "
        "of this order)",
    )
    parser.add_argument("--mock-decode-s", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    urls = images(args.images, args.image_side)
    draw = zipf_draw(args.requests, args.images, args.zipf, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="encode-cache-"))
    runs = []
    with NatsServer() as nats_server:
        for name in SETTINGS:
            run = run_setting(nats_server.url, tmp, name, args, urls, draw)
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {
        "benchmark": "encode_cache",
        "machine": machine_info(),
        "config": {
            "engine": args.engine,
            "model_path": args.model_path or "tiny (generated)",
            "requests": args.requests,
            "images": args.images,
            "image_side": args.image_side,
            "distinct_images_drawn": len(set(draw)),
            "zipf": args.zipf,
            "encoders": args.encoders,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "mock_encode_s_per_image": args.mock_encode_s if args.engine == "mock" else None,
            "mock_decode_s_per_step": args.mock_decode_s if args.engine == "mock" else None,
        },
        "runs": runs,
    }
    default = "encode_cache_cpu.json" if args.engine == "mock" else "encode_cache_hf_tiny_cpu.json"
    out = Path(args.out) if args.out else RESULTS / default
    out.write_text(json.dumps(result, indent=2) + "\n")
    if chart(result, out.with_suffix(".png")):
        print(f"chart: {out.with_suffix('.png')}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
