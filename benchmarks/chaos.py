"""Chaos: E/P/D with two instances of every stage under load, one worker killed (SIGKILL) and
restarted every `--kill-every` seconds.

What should hold: only requests a killed worker held after their first token fail (those
before it migrate), nothing leaks (every in-flight gauge and NIXL pool back to 0 once the load
stops), and the stack answers at the end.

    python benchmarks/chaos.py [--seconds 300] [--kill-every 20] [--engine hf] [--out FILE]
"""

import argparse
import asyncio
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import report_header

from triptych.runtime.nats_server import NatsServer
from triptych.runtime.port_file import read_port_file

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "chaos"
WORKERS = {
    "encode": ["encode_worker"],
    "prefill": ["prefill_worker", "--dedicated-mm-encoder"],
    "decode": ["decode_worker", "--disaggregation-mode", "decode", "--dedicated-mm-encoder"],
}


@dataclass
class Worker:
    """One worker process that can be killed and started again with the same flags."""

    stage: str
    args: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"triptych.components.{self.args[0]}", *self.args[1:]],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@dataclass
class Tally:
    ok: int = 0
    failed_after_first_token: int = 0
    failed_before_first_token: list[str] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)


def picture(seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (56 + 28 * (seed % 3), 56))
    image.putdata([(rng.randrange(256),) * 3 for _ in range(image.width * image.height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def client(url: str, model: str, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            content: list[dict[str, Any]] = [{"type": "text", "text": f"item {rng.random()}"}]
            if rng.random() < 0.5:
                content.insert(0, {"type": "image_url", "image_url": {"url": picture(seed)}})
            body = {
                "model": model,
                "stream": True,
                "max_tokens": rng.randrange(8, 32),
                "messages": [{"role": "user", "content": content}],
            }
            begun = time.perf_counter()
            first_token = False
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                    if reply.status_code != 200:
                        tally.failed_before_first_token.append(f"HTTP {reply.status_code}")
                        continue
                    done = False
                    async for line in reply.aiter_lines():
                        if '"error"' in line:
                            break
                        first_token = first_token or '"content":"' in line
                        done = done or line == "data: [DONE]"
                if done and not first_token:
                    done = False
                if done:
                    tally.ok += 1
                    tally.latency.append(time.perf_counter() - begun)
                elif first_token:
                    tally.failed_after_first_token += 1
                else:
                    tally.failed_before_first_token.append("stream ended before a token")
            except httpx.HTTPError as error:
                if first_token:
                    tally.failed_after_first_token += 1
                else:
                    tally.failed_before_first_token.append(f"{type(error).__name__}")


async def gauges(nats_url: str) -> dict[str, list[dict[str, Any]]]:
    """Every live worker's NATS micro STATS data, by stage."""
    nc = await nats.connect(nats_url)
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        for stage in WORKERS:
            inbox = nc.new_inbox()
            answers: list[dict[str, Any]] = []

            async def collect(msg: Any, into: list[dict[str, Any]] = answers) -> None:
                if msg.data:  # an empty reply is a "no responders" status, not an instance
                    into.append(json.loads(msg.data))

            sub = await nc.subscribe(inbox, cb=collect)
            await nc.publish(f"$SRV.STATS.{NAMESPACE}-{stage}", b"", reply=inbox)
            await asyncio.sleep(0.5)
            await sub.unsubscribe()
            found[stage] = [a["endpoints"][0].get("data") or {} for a in answers]
    finally:
        await nc.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--kill-every", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--engine", default="hf")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chaos_cpu.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="triptych-chaos-"))
    rng = random.Random(11)
    kills: list[dict[str, Any]] = []
    with NatsServer() as server:
        env = {**os.environ, "NATS_URL": server.url, "TRIPTYCH_NAMESPACE": NAMESPACE}
        workers = [
            Worker(stage, [*flags, "--engine", args.engine], logs / f"{stage}{copy}.log", env)
            for stage, flags in WORKERS.items()
            for copy in range(2)
        ]
        for worker in workers:
            worker.start()
        port_file = logs / "frontend.port"
        frontend = subprocess.Popen(
            [
                *(sys.executable, "-m", "triptych.components.frontend", "--http-port", "0"),
                *("--port-file", str(port_file), "--topology", "E/P/D"),
            ],
            stdout=(logs / "frontend.log").open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        try:
            url = wait_ready(port_file)
            model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            tally = Tally()

            async def run() -> None:
                deadline = time.monotonic() + args.seconds
                load = asyncio.gather(
                    *(client(url, model, deadline, s, tally) for s in range(args.concurrency))
                )
                while time.monotonic() + args.kill_every < deadline:
                    await asyncio.sleep(args.kill_every)
                    victim = rng.choice(workers)
                    victim.kill()
                    victim.start()
                    victim.restarts += 1
                    kills.append(
                        {
                            "at_s": args.seconds - (deadline - time.monotonic()),
                            "stage": victim.stage,
                        }
                    )
                await load

            began = time.monotonic()
            asyncio.run(run())
            elapsed = time.monotonic() - began
            time.sleep(15)  # restarted workers rejoin; streams of killed ones have failed
            after = asyncio.run(gauges(server.url))
            final = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": model,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "still there?"}],
                },
                timeout=60,
            )
            frontend_in_flight = [
                line
                for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
                if line.startswith("triptych_frontend_requests_in_flight ")
            ]
        finally:
            frontend.terminate()
            frontend.wait(30)
            for worker in workers:
                if worker.process is not None:
                    worker.process.terminate()
            for worker in workers:
                if worker.process is not None:
                    try:
                        worker.process.wait(60)
                    except subprocess.TimeoutExpired:
                        worker.kill()
    latency = sorted(tally.latency)
    report = {
        **report_header(
            f"chaos: E/P/D, 2 instances per stage, {args.engine} engine (tiny "
            f"Qwen2.5-VL), {args.concurrency} clients, text and 1 image; a random worker killed "
            f"(SIGKILL) and restarted every {args.kill_every:g} s"
        ),
        "seconds": elapsed,
        "kills": kills,
        "requests_ok": tally.ok,
        "failed_after_first_token": tally.failed_after_first_token,
        "failed_before_first_token": len(tally.failed_before_first_token),
        "failed_before_first_token_samples": tally.failed_before_first_token[:10],
        "latency_ok_ms": {
            "p50": latency[len(latency) // 2] * 1e3 if latency else None,
            "p99": latency[int(0.99 * (len(latency) - 1))] * 1e3 if latency else None,
        },
        "after_load": {
            "worker_gauges": after,
            "in_flight_total": sum(g.get("in_flight", 0) for gs in after.values() for g in gs),
            "transfer_pool_bytes_in_use_total": sum(
                g.get("transfer_pool_bytes_in_use", 0) for gs in after.values() for g in gs
            ),
            "frontend_in_flight": frontend_in_flight,
            "final_request_status": final.status_code,
        },
        "logs": str(logs),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


def wait_ready(port_file: Path, timeout: float = 300) -> str:
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        ports = read_port_file(port_file)
        if ports is not None:
            url = f"http://127.0.0.1:{ports['http']}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise TimeoutError("the stack did not become ready")


if __name__ == "__main__":
    main()
