"""The planner's split against two EPD workers: goodput at TTFT p99 <= 1 s, per mix, in one run.

Same checkpoint and load as multi_gpu.py (Qwen2.5-VL-7B-shaped, random bf16, 64 output tokens,
Poisson arrivals). For each mix (one 448x448 image; three 1024x1024 images):

1. two EPD workers (one per GPU) serve rising request rates until TTFT p99 passes the target;
   meanwhile the planner reads the workers' live load signals (``load_*`` in their NATS
   metadata) and calibrates its encode and prefill costs from them, and the frontend's host
   time per image from its ``/metrics`` over the sweep;
2. the planner plans the split for the mix's workload profile on the GPUs
   (``python -m triptych.components.planner plan`` does the same from the command line);
3. the planner's split is launched and serves the same rates.

Goodput is the highest completed requests/s at a rate whose TTFT p99 stayed within the target.
Every image of every request is a noise picture of its own, so the encoders' embedding cache
cannot hide their load; before a layout is measured, every instance of every stage has served
warm-up requests of the mix (checked in their load signals).

    python benchmarks/planner.py --out DIR [--gpus 2] [--engine mock: a dry run on a CPU]
"""

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvloop
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import chat_body, stream_chat
from gpu_epd import build_checkpoint, run_info
from launcher import launch, stop

from triptych.components.planner.model import (
    GpuPack,
    StageCosts,
    WorkloadProfile,
    calibrate,
    calibrate_frontend,
    calibrate_latency,
    capacity,
)
from triptych.components.planner.placement import plan
from triptych.components.planner.signals import image_decode_seconds, read_signals
from triptych.protocol.load import StageLoad
from triptych.runtime import Runtime, RuntimeConfig
from triptych.runtime.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "Describe these pictures in detail, noting colours, shapes, textures and anything unusual "
    "about them."
)
MIXES: dict[str, dict[str, Any]] = {
    "one_448_image": {
        "images": 1,
        "size": 448,
        "seconds": 6,
        "rates": [16, 32, 40, 48, 56, 64, 80, 96],
    },
    "three_1024_images": {
        "images": 3,
        "size": 1024,
        "seconds": 8,
        "rates": [0.5, 1, 1.5, 2, 3, 4, 5, 6],
    },
}
TTFT_TARGET_S = 1.0
WARM_ROUNDS = 4
"""Warm-up rounds at most: each sends concurrent requests until every instance has served."""
MOCK_COSTS = {
    # --engine mock: a dry run of the whole procedure on a CPU (simulated stage costs)
    "mock": [
        "--mock-encode-s-per-image",
        "0.01",
        "--mock-prefill-s-per-token",
        "0.00002",
        "--mock-decode-s-per-step",
        "0.005",
    ]
}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


LOADERS = 12
"""Processes that send the load at most: one event loop parsing a few thousand streamed chunks a
second saturates near 50 requests/s; Poisson arrivals split over several are Poisson still."""
PER_LOADER = 8
"""Requests per second one load generator process sends at most."""


def loader(conn: Connection, url: str, bodies: list[bytes]) -> None:
    """A load generator process: for each (rate, seconds, seed) it is sent, Poisson arrivals
    of its own bodies; it answers each request's timings (None: failed), how many it sent,
    and the seconds until the last one finished."""
    stream = itertools.cycle(bodies)
    conn.send("ready")
    while (command := conn.recv()) is not None:
        rate, seconds, seed = command
        conn.send(uvloop.run(arrivals(url, stream, rate, seconds, random.Random(seed))))


async def arrivals(
    url: str, bodies: Iterator[bytes], rate: float, seconds: float, rng: random.Random
) -> tuple[list[dict[str, float] | None], float]:
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=None)
    ) as client:

        async def timed(body: bytes) -> dict[str, float] | None:
            try:
                streamed = await stream_chat(client, body)
            except httpx.HTTPError:
                return None
            return {"ttft": streamed.ttft_s, "step": streamed.step_s, "tokens": streamed.tokens}

        tasks = []
        started = time.perf_counter()
        while True:  # the first arrival too is a draw: loaders do not all send at once
            await asyncio.sleep(rng.expovariate(rate))
            if time.perf_counter() - started >= seconds:
                break
            tasks.append(asyncio.create_task(timed(next(bodies))))
        if not tasks:
            return [], time.perf_counter() - started
        done, pending = await asyncio.wait(tasks, timeout=20)
        for task in pending:
            task.cancel()
        results = [t.result() for t in done] + [None] * len(pending)
        return results, time.perf_counter() - started


class Loaders:
    """`LOADERS` load generator processes, each with its share of the sweep's bodies."""

    def __init__(self, url: str, bodies: list[bytes], count: int = LOADERS) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for k in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=loader, args=(theirs, url, bodies[k::count]))
            process.start()
            self.conns.append(ours)
            self.processes.append(process)
        for conn in self.conns:
            conn.recv()  # started: its bodies are in

    async def run(
        self, rate: float, seconds: float, seed: int
    ) -> tuple[list[dict[str, float] | None], float]:
        for k, conn in enumerate(self.conns):
            conn.send((rate / len(self.conns), seconds, seed * 1000 + k))
        answers = await asyncio.gather(*(asyncio.to_thread(conn.recv) for conn in self.conns))
        return [r for results, _ in answers for r in results], max(e for _, e in answers)

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for process in self.processes:
            process.join(timeout=30)


async def one_rate(
    loaders: Loaders, rate: float, seconds: float, seed: int, runtime: Runtime | None
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Poisson arrivals at `rate` for `seconds`; the stages' signals as arrivals end."""
    sent = asyncio.create_task(loaders.run(rate, seconds, seed))
    await asyncio.sleep(seconds)
    signals: dict[str, list[dict[str, Any]]] = {}
    if runtime is not None:
        read = await read_signals(runtime, ("encode", "prefill", "decode"))
        signals = {s: [x.model_dump() for x in sig.loads] for s, sig in read.items()}
    results, elapsed = await sent
    ok = [r for r in results if r is not None]
    ttfts = [r["ttft"] * 1e3 for r in ok]
    steps = [r["step"] * 1e3 for r in ok if r["tokens"] > 1]
    return {
        "rate_req_per_s": rate,
        "sent": len(results),
        "sent_req_per_s": len(results) / seconds,
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "throughput_req_per_s": len(ok) / elapsed,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_ms_p99": percentile(ttfts, 0.99),
        "itl_ms_mean_p99": percentile(steps, 0.99),
    }, signals


def within_target(row: dict[str, Any]) -> bool:
    p99 = row["ttft_ms_p99"]
    return row["errors"] == 0 and p99 is not None and p99 <= TTFT_TARGET_S * 1e3


def noise_picture(size_and_seed: tuple[int, int]) -> str:
    """A data URL of a grey noise PNG of its own (as `chat_client.png`, seeded: the pool's
    processes must not draw the same noise)."""
    size, seed = size_and_seed
    rng = np.random.default_rng(seed)
    grey = np.clip(rng.normal(128, 64, (size, size)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def distinct_bodies(model: str, mix: dict[str, Any], max_tokens: int, extra: int) -> list[bytes]:
    """Enough requests for the whole sweep (and `extra` for warm-up), no image used twice."""
    expected = sum(rate * mix["seconds"] for rate in mix["rates"])
    requests = int(expected * 1.5) + 240 + extra
    wanted = [(model, mix["size"], mix["images"], seed, max_tokens) for seed in range(requests)]
    with ProcessPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        return list(pool.map(encoded_body, wanted, chunksize=4))


def encoded_body(spec: tuple[str, int, int, int, int]) -> bytes:
    """One request's JSON, its images its own: encoded here, in the pool, once."""
    model, size, images, seed, max_tokens = spec
    pictures = [noise_picture((size, seed * images + i)) for i in range(images)]
    return json.dumps(chat_body(model, pictures, TEXT, max_tokens)).encode()


async def warm_up(
    client: httpx.AsyncClient, bodies: Iterator[bytes], runtime: Runtime | None
) -> dict[str, Any]:
    """Requests of the mix, in concurrent rounds, until every instance of every stage has
    served one (its signals show work in their window): no instance meets its first batch
    shape, or its first image of this size, while measured."""
    served: dict[str, list[bool]] = {}
    for round_ in range(1, WARM_ROUNDS + 1):
        await asyncio.gather(*(stream_chat(client, next(bodies)) for _ in range(8)))
        if runtime is None:
            return {"rounds": round_}
        read = await read_signals(runtime, ("encode", "prefill", "decode"))
        served = {
            stage: [
                load.images_per_s > 0
                if stage == "encode"
                else load.prompt_tokens_per_s > 0 or load.output_tokens_per_s > 0
                for load in signals.loads
            ]
            for stage, signals in read.items()
            if signals.loads
        }
        if all(all(flags) for flags in served.values()):
            break
    return {"rounds": round_, "served": served}


async def sweep(
    url: str,
    mix: dict[str, Any],
    bodies: list[bytes],
    runtime: Runtime | None,
    deadline: float,
    count: int = LOADERS,
) -> dict[str, Any]:
    """Rising rates until TTFT p99 passes the target (or time runs out), with the stages'
    signals at the end of the last rate's arrivals (the most load: the best calibration) and
    the frontend's CPU seconds per image decoded over the rates."""
    rows: list[dict[str, Any]] = []
    signals: dict[str, list[dict[str, Any]]] = {}
    warm_bodies, bodies = bodies[: 8 * WARM_ROUNDS], bodies[8 * WARM_ROUNDS :]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        try:
            warm = await warm_up(client, iter(warm_bodies), runtime)
        except httpx.HTTPStatusError as error:
            return {"rows": [], "goodput_req_per_s": 0.0, "signals": {}, "error": str(error)}
    print(f"  warm-up: {json.dumps(warm)}", flush=True)
    decoded = await image_decode_seconds(f"{url}/metrics")
    loaders = Loaders(url, bodies, min(count, math.ceil(max(mix["rates"]) / PER_LOADER)))
    try:
        for seed, rate in enumerate(mix["rates"]):
            if time.monotonic() + mix["seconds"] + 20 > deadline:
                print("  out of time for this sweep", flush=True)
                break
            try:
                row, signals = await one_rate(loaders, rate, mix["seconds"], seed, runtime)
            except (EOFError, OSError) as error:  # a load generator died: say so, go on
                print(f"  load generator failed at rate {rate}: {error!r}", flush=True)
                break
            rows.append(row)
            print(f"  rate {rate}: {json.dumps(row)}", flush=True)
            if not within_target(row):
                break
    finally:
        with contextlib.suppress(OSError):  # a load generator that died cannot be told
            loaders.close()
    passing = [r["throughput_req_per_s"] for r in rows if within_target(r)]
    frontend = (await image_decode_seconds(f"{url}/metrics")).per_image_since(decoded)
    return {
        "rows": rows,
        "goodput_req_per_s": max(passing, default=0.0),
        "signals": signals,
        "frontend_s_per_image": frontend,
        "warm_up": warm,
    }


def serve_and_sweep(
    script: list[str],
    checkpoint: Path,
    log: Path,
    mixes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    env: dict[str, str],
    deadline: float,
) -> dict[str, Any]:
    begun = time.perf_counter()
    launcher, url = launch(
        script[0],
        [
            *script[1:],
            "--engine",
            args.engine,
            "--device",
            "cuda" if args.engine == "hf" else "cpu",
            "--model-path",
            str(checkpoint),
            "--",
            "--transfer-pool-mb",
            "2048",
            "--max-running-requests",
            str(args.max_running_requests),
            *MOCK_COSTS.get(args.engine, []),
        ],
        log,
        env=env,
    )
    result: dict[str, Any] = {"ready_s": round(time.perf_counter() - begun, 1)}
    print(f"{' '.join(script)}: ready in {result['ready_s']}s", flush=True)

    async def run_all() -> None:
        config = RuntimeConfig(nats_url=env["NATS_URL"], namespace=env["TRIPTYCH_NAMESPACE"])
        async with Runtime(config, name="benchmark") as runtime:
            for name, mix in mixes.items():
                bodies = distinct_bodies(checkpoint.name, mix, args.max_tokens, 8 * WARM_ROUNDS)
                result[name] = await sweep(url, mix, bodies, runtime, deadline, args.loaders)

    try:
        uvloop.run(run_all())  # the load generator's loop, as fast as the servers'
    finally:
        stop(launcher)
    return result


def profile_of(mix: dict[str, Any], max_tokens: int) -> WorkloadProfile:
    return WorkloadProfile(
        images_per_request=mix["images"],
        image_width=mix["size"],
        image_height=mix["size"],
        text_tokens=40,
        output_tokens=max_tokens,
        ttft_target_s=TTFT_TARGET_S,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/triptych-7b-random"))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=540, help="stop sweeping after this")
    parser.add_argument("--report", default="planner_h200x2.json")
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--engine", choices=("hf", "mock"), default="hf")
    parser.add_argument("--loaders", type=int, default=LOADERS, help="load generator processes")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    mixes = {name: MIXES[name] for name in args.mixes.split(",")}
    if args.engine == "hf":
        checkpoint = build_checkpoint(args.checkpoint, "7b", "cuda")
    else:
        from triptych.models.tiny import default_model_path

        checkpoint = default_model_path()
    nats = NatsServer()
    nats.start()
    env = {k: v for k, v in os.environ.items() if k != "NATS_TOKEN"}
    env.update(NATS_URL=nats.url, TRIPTYCH_NAMESPACE=f"planner{os.getpid()}")
    gpus = ",".join(str(g) for g in range(args.gpus))
    report: dict[str, Any] = {
        "benchmark": "planner's split vs one EPD worker per GPU: goodput at TTFT p99 <= 1 s",
        "run": run_info("cuda:0" if args.engine == "hf" else "cpu"),
        "engine": args.engine,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "ttft_p99_target_s": TTFT_TARGET_S,
        "max_tokens": args.max_tokens,
        "mix_settings": mixes,
        "max_running_requests": args.max_running_requests,
        "load_generator_processes": args.loaders,
        "mixes": {},
        "ratios": {},
    }

    def save() -> None:
        (args.out / args.report).write_text(json.dumps(report, indent=2) + "\n")

    try:
        baseline = serve_and_sweep(
            ["agg.sh", "--gpus", gpus],
            checkpoint,
            args.out / "planner_epd.log",
            mixes,
            args,
            env,
            deadline,
        )
        for name, mix in mixes.items():
            profile = profile_of(mix, args.max_tokens)
            defaults = StageCosts(max_running=args.max_running_requests)
            measured = {
                stage: [StageLoad.model_validate(x) for x in loads]
                for stage, loads in baseline[name]["signals"].items()
            }
            costs = calibrate(defaults, profile, measured)
            costs = calibrate_frontend(costs, profile, baseline[name].get("frontend_s_per_image"))
            epd = [GpuPack(aggregated=1)] * args.gpus
            rows = baseline[name]["rows"]
            if rows and rows[0]["ttft_ms_p50"] is not None:  # the lowest rate's
                costs = calibrate_latency(costs, profile, epd, rows[0]["ttft_ms_p50"] / 1e3)
            chosen = plan(profile, costs, args.gpus)
            epd_model = capacity(epd, profile, costs)
            report["mixes"][name] = {
                "profile": asdict(profile),
                "costs_calibrated": asdict(costs),
                "plan": chosen.describe(),
                "plan_from_default_costs": plan(profile, defaults, args.gpus).label,
                "model_2xEPD_req_per_s": round(epd_model.requests_per_s, 3),
                "2xEPD": {k: v for k, v in baseline[name].items()},
            }
            print(
                f"{name}: planner chose {chosen.label}: {json.dumps(chosen.describe())}", flush=True
            )
        report["2xEPD_ready_s"] = baseline["ready_s"]
        save()
        for name, mix in mixes.items():
            chosen_plan = report["mixes"][name]["plan"]
            command = chosen_plan["launch"].split()
            if command[0] == "launch/agg.sh":
                result = {**report["mixes"][name]["2xEPD"], "same_as_baseline": True}
            elif deadline - time.monotonic() < 90:
                print(f"{name}: no time left to launch the planner's split", flush=True)
                continue
            else:
                script = [Path(command[0]).name, *command[1:]]
                try:
                    served = serve_and_sweep(
                        script,
                        checkpoint,
                        args.out / f"planner_{name}.log",
                        {name: mix},
                        args,
                        env,
                        deadline,
                    )
                except RuntimeError as error:  # it did not start: say so, go on
                    report["mixes"][name]["planner"] = {"error": str(error)[-2000:]}
                    save()
                    continue
                result = {**served[name], "ready_s": served["ready_s"]}
            report["mixes"][name]["planner"] = result
            base = report["mixes"][name]["2xEPD"]["goodput_req_per_s"]
            ratio = round(result["goodput_req_per_s"] / base, 3) if base else None
            report["ratios"][f"goodput planner / 2xEPD {name}"] = ratio
            save()
    finally:
        nats.stop()
        save()
    print(json.dumps(report["ratios"], indent=1))


if __name__ == "__main__":
    main()
