"""Request-path overhead, side by side with Dynamo's Rust frontend.

Every system serves a simulated engine whose time is ~0, so every millisecond is the request
path's own: triptych E/P/D and EPD on the mock engine streaming one chunk per token, and
(with `--dynamo-dir`) NVIDIA Dynamo's frontend + mocker (`../shared/anchors/dynamo-cpu/`:
installed there, started with its TCP_NODELAY shim, speed-up 1e6). Each system is measured in
turn, in alternating order over `--rounds`, with the same client: streamed text-only chat
completions of 16 tokens, time to the first chunk with text at concurrency 1, and requests/s at
concurrency 32. Client, servers and NATS share the machine's cores. Dynamo's frontend runs
on every core (tokio); triptych's runs `--frontend-processes` processes (default 2, one per
core of the 2-core machine these figures come from). Every system runs in a session of its
own by default (`--sessions own`), as services do, or in the client's (`--sessions shared`):
Linux's autogroup scheduler shares the CPU fairly between sessions first, so the client and
the system under test must stand in the same relation for every system.

    python benchmarks/overhead.py [--dynamo-dir DIR] [--rounds 2] [--frontend-processes 2]
        [--sessions own|shared] [--out FILE]

The JSON holds every measurement, the median of each figure over the rounds, and `ratios`
whose keys say what is divided by what. Each c=32 run also records the CPU each process (the
frontend's group as one), the client and the whole machine spent: in cores and per request.
"""

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import LoadConfig, report_header, run_load

ROOT = Path(__file__).resolve().parents[1]
# one chunk per token: a decode step of 1 us (a step of 0 sends the whole answer at once); no
# cost elsewhere (the mock's defaults are a real model's)
PER_TOKEN = [
    "--engine",
    "mock",
    "--",
    "--mock-encode-s-per-image",
    "0",
    "--mock-prefill-s-per-token",
    "0",
    "--mock-decode-s-per-step",
    "0.000001",
]
TRIPTYCH = {"E/P/D": "multimodal_disagg.sh", "EPD": "agg.sh"}
MAX_TOKENS = 16


class Dynamo:
    """Dynamo 1.6.1's frontend and mocker, as the anchor's start.sh runs them.

    start.sh serves on port 8000 and keeps its pid files in the (shared) install folder: this
    waits until nobody else serves there, and stops only the processes its own start wrote.
    """

    URL = "http://127.0.0.1:8000"

    def __init__(self, directory: Path, own_session: bool = True) -> None:
        self.directory = directory
        self.own_session = own_session
        self._pids: dict[str, int] = {}

    def start(self) -> str:
        for _ in range(600):  # another Dynamo on the machine: wait for it to go
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.URL}/v1/models", timeout=1)
                time.sleep(1)
                continue
            break
        else:
            raise RuntimeError("port 8000 stayed busy: another Dynamo is running")
        env = {
            **os.environ,
            "DYN_DIR": str(self.directory),
            "FRONTEND_PRELOAD": str(self.directory / "nodelay_shim.so"),
        }
        subprocess.run(
            ["bash", str(self.directory / "start.sh"), "--speedup-ratio", "1000000"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            start_new_session=self.own_session,  # the processes it starts in the background too
        )
        self._pids = {
            name: int((self.directory / name).read_text())
            for name in ("mocker.pid", "frontend.pid")
            if (self.directory / name).exists()
        }
        for _ in range(120):
            try:
                if "tiny" in httpx.get(f"{self.URL}/v1/models", timeout=2).text:
                    return self.URL
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("Dynamo did not come up")

    def processes(self) -> dict[str, psutil.Process]:
        """The started processes, by pid file name (mocker.pid, frontend.pid)."""
        return {name: psutil.Process(pid) for name, pid in self._pids.items()}

    def stop(self) -> None:
        for pid in self._pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._pids = {}
        time.sleep(3)


def _machine_times() -> tuple[int, int]:
    """All CPU time and idle time of the machine so far (jiffies, /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


class CpuShare:
    """CPU used meanwhile, in cores: by each group of processes, by this process (the client)
    and by the whole machine (`machine_busy`)."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self._groups = groups
        self._begun = self._now()

    def _now(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        total, idle = _machine_times()
        now = {
            name: sum(sum(p.cpu_times()[:2]) for p in group) for name, group in self._groups.items()
        }
        return {**now, "client": own.ru_utime + own.ru_stime, "_total": total, "_idle": idle}

    def cores(self, seconds: float) -> dict[str, float]:
        now = self._now()
        spent = {name: (now[name] - self._begun[name]) / seconds for name in now}
        busy = 1 - (now["_idle"] - self._begun["_idle"]) / (now["_total"] - self._begun["_total"])
        cores = {k: v for k, v in spent.items() if not k.startswith("_")}
        return {**cores, "machine_busy": busy * (os.cpu_count() or 1)}


async def measure(
    url: str,
    model: str,
    requests_c1: int,
    seconds_c32: float,
    groups: dict[str, list[psutil.Process]],
) -> dict[str, Any]:
    """c=1 TTFT and c=32 throughput, with the CPU each of `groups` (and the client, and the
    machine) spent per request during the c=32 run (its warm-up included)."""
    common: dict[str, Any] = {
        "url": url,
        "model": model,
        "max_tokens": MAX_TOKENS,
        "prompt_tokens": 16,
        "stream": True,
        "ignore_eos": True,
    }
    c1 = await run_load(LoadConfig(concurrency=1, requests=requests_c1, warmup=50, **common))
    cpu = CpuShare(groups)
    begun = time.monotonic()
    c32 = await run_load(LoadConfig(concurrency=32, duration=seconds_c32, warmup=320, **common))
    cores = cpu.cores(time.monotonic() - begun)
    keep = ("requests", "errors", "requests_per_s", "ttft_ms", "latency_ms", "itl_ms")
    rate = c32["requests_per_s"]
    return {
        "c1": {k: c1[k] for k in keep},
        "c32": {k: c32[k] for k in keep},
        "c32_cpu_cores": cores,
        "c32_cpu_ms_per_request": {k: 1000 * v / rate for k, v in cores.items()} if rate else {},
    }


def triptych_processes(launcher_pid: int) -> dict[str, list[psutil.Process]]:
    """A launched stack's processes by component (the frontend's group as one)."""
    from profile_path import processes

    groups: dict[str, list[psutil.Process]] = {}
    for role, process in processes(launcher_pid).items():
        groups.setdefault(role.split("-")[0] if role != "nats-server" else role, []).append(process)
    return groups


def one_round(system: str, args: argparse.Namespace) -> dict[str, Any]:
    """One system's measurement, with the machine's load average (1, 5, 15 min) after it:
    the machine is shared, and its load is part of the figure."""
    result = _one_round(system, args)
    result["loadavg_after"] = list(os.getloadavg())
    return result


def _one_round(system: str, args: argparse.Namespace) -> dict[str, Any]:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"overhead-{system.replace('/', '')}.log"
    own_session = args.sessions == "own"
    if system == "Dynamo":
        dynamo = Dynamo(args.dynamo_dir, own_session)
        url = dynamo.start()
        try:
            groups = {
                name.removesuffix(".pid"): [process, *process.children(recursive=True)]
                for name, process in dynamo.processes().items()
            }
            return asyncio.run(measure(url, "tiny", args.requests_c1, args.seconds_c32, groups))
        finally:
            dynamo.stop()
    processes = ["--frontend-processes", str(args.frontend_processes)]
    launcher, url = launch(TRIPTYCH[system], [*processes, *PER_TOKEN], log, own_session=own_session)
    try:
        groups = triptych_processes(launcher.pid)
        return asyncio.run(measure(url, args.model, args.requests_c1, args.seconds_c32, groups))
    finally:
        stop(launcher)


def median(results: list[dict[str, Any]], level: str, *path: str) -> float:
    values = []
    for result in results:
        value: Any = result[level]
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dynamo-dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-c1", type=int, default=500)
    parser.add_argument("--seconds-c32", type=float, default=20.0)
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--frontend-processes", type=int, default=2)
    parser.add_argument(
        "--systems", default="E/P/D,EPD", help="triptych topologies to run (comma-separated)"
    )
    parser.add_argument(
        "--sessions",
        choices=("own", "shared"),
        default="own",
        help="each system in a session of its own, or in the client's",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/overhead_cpu.json"))
    args = parser.parse_args()
    topologies = [system for system in args.systems.split(",") if system]
    if unknown := set(topologies) - set(TRIPTYCH):
        parser.error(f"--systems: not a topology here: {', '.join(sorted(unknown))}")
    systems = [*topologies, *(["Dynamo"] if args.dynamo_dir else [])]
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    order: list[str] = []
    for round_index in range(args.rounds):
        for system in systems if round_index % 2 == 0 else reversed(systems):
            result = one_round(system, args)
            runs[system].append(result)
            order.append(system)
            print(
                f"round {round_index + 1} {system:6s} c=1 TTFT p50 "
                f"{result['c1']['ttft_ms']['p50']:.2f} ms | c=32 "
                f"{result['c32']['requests_per_s']:.0f} req/s "
                f"(errors {result['c1']['errors'] + result['c32']['errors']}) "
                f"load {result['loadavg_after'][0]:.1f}",
                flush=True,
            )
    medians = {
        system: {
            "c1_ttft_p50_ms": median(results, "c1", "ttft_ms", "p50"),
            "c1_latency_p50_ms": median(results, "c1", "latency_ms", "p50"),
            "c32_requests_per_s": median(results, "c32", "requests_per_s"),
            "c32_machine_cpu_ms_per_request": median(
                results, "c32_cpu_ms_per_request", "machine_busy"
            ),
        }
        for system, results in runs.items()
    }
    ratios: dict[str, float] = {}
    if "Dynamo" in medians:
        peer = medians["Dynamo"]
        for system in (s for s in medians if s != "Dynamo"):
            figures = medians[system]
            ratios[f"{system} c32 req/s / Dynamo c32 req/s"] = (
                figures["c32_requests_per_s"] / peer["c32_requests_per_s"]
            )
            ratios[f"{system} c1 TTFT p50 / Dynamo c1 TTFT p50"] = (
                figures["c1_ttft_p50_ms"] / peer["c1_ttft_p50_ms"]
            )
    report = {
        **report_header(
            "request-path overhead: streamed text chat, 16 tokens one chunk per token, "
            "simulated engines at ~0 cost; c=1 TTFT at the first chunk with text, c=32 req/s"
        ),
        "triptych_frontend_processes": args.frontend_processes,
        "sessions": args.sessions,
        "order": order,
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"medians": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
