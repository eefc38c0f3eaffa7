"""Where the request path's time goes: py-spy on every process of a stack under load.

Starts a topology on the mock engine streaming one chunk per token (as `overhead.py` does),
runs the streamed 16-token load at concurrency 32, and samples every triptych process and
nats-server's share of the CPU while it runs. Writes, per process, py-spy's collapsed stacks
(`--out-dir`/<process>.txt, for flame graphs) and prints the functions with the most samples
(self time, and inclusive time of the request path's own functions).

    python benchmarks/profile_path.py [--topology E/P/D] [--seconds 20] [--rate 200]
        [--frontend-processes 2]
"""

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import LoadConfig, run_load
from overhead import MAX_TOKENS, PER_TOKEN, TRIPTYCH

ROOT = Path(__file__).resolve().parents[1]
PYSPY = Path(sys.executable).with_name("py-spy")


def processes(launcher_pid: int) -> dict[str, psutil.Process]:
    """The stack's processes by role (frontend, encode, prefill, decode, nats-server; the
    frontend's other processes frontend-2, frontend-3, ...)."""
    found: dict[str, psutil.Process] = {}
    followers = 0
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "nats-server" in line:
            found["nats-server"] = child
        for role in ("frontend", "encode_worker", "prefill_worker", "decode_worker"):
            if f"triptych.components.{role}" in line:
                name = role.removesuffix("_worker")
                if "--frontend-group" in line:
                    followers += 1
                    name = f"frontend-{followers + 1}"
                found[name] = child
    return found


def summarize(collapsed: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's collapsed output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return {
        "samples": total,
        "self": [(f, c / total) for f, c in own.most_common(top)] if total else [],
        "inclusive": [(f, c / total) for f, c in inclusive.most_common(top * 3)] if total else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", default="E/P/D", choices=tuple(TRIPTYCH))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--frontend-processes", type=int, default=2)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks/results/profile_cpu"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stack.log"
    processes_flag = ["--frontend-processes", str(args.frontend_processes)]
    launcher, url = launch(TRIPTYCH[args.topology], [*processes_flag, *PER_TOKEN], log)
    try:
        stack = processes(launcher.pid)
        load = LoadConfig(
            url=url,
            model=args.model,
            concurrency=32,
            duration=args.seconds + 4,
            warmup=320,
            max_tokens=MAX_TOKENS,
            prompt_tokens=16,
        )
        spies = {}
        loop = asyncio.new_event_loop()
        loading = loop.create_task(run_load(load))
        loop.run_until_complete(asyncio.sleep(2.0 + 320 / 1000))  # past the warm-up
        cpu_before = {role: p.cpu_times() for role, p in stack.items()}
        for role, proc in stack.items():
            if role == "nats-server":
                continue
            spies[role] = subprocess.Popen(
                [
                    str(PYSPY),
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out / f"{role}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        begun = time.monotonic()
        result = loop.run_until_complete(loading)
        loop.close()
        elapsed = time.monotonic() - begun
        cpu = {
            role: (sum(p.cpu_times()[:2]) - sum(cpu_before[role][:2])) / elapsed
            for role, p in stack.items()
        }
        for spy in spies.values():
            spy.wait(60)
    finally:
        stop(launcher)
    report = {
        "topology": args.topology,
        "frontend_processes": args.frontend_processes,
        "requests_per_s": result["requests_per_s"],
        "ttft_p50_ms": result["ttft_ms"]["p50"],
        "cpu_cores_per_process": cpu,
        "cpu_ms_per_request": {
            role: 1000 * share / result["requests_per_s"] for role, share in cpu.items()
        },
        "profiled_s": elapsed,
        "functions": {role: summarize(out / f"{role}.txt", args.top) for role in spies},
    }
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "functions"}, indent=1))
    for role, summary in report["functions"].items():
        print(f"--- {role}: {summary['samples']} samples; self time")
        for function, share in summary["self"]:
            print(f"  {share * 100:5.1f}%  {function}")


if __name__ == "__main__":
    main()
