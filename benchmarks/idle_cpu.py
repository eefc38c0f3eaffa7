"""CPU that idle workers burn: each process of a topology, after a warm-up, with no requests.

An idle serving process should cost (almost) nothing: a busy-polling thread steals a core from
every neighbour on the host, which on a small machine slows the stages that do work (on the
2-core CI box, three spinning workers made E/P/D's first token 2.8x slower than EPD's).

    python benchmarks/idle_cpu.py [--topology multimodal_disagg.sh] [--seconds 10] [--out FILE]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import chat_body, picture
from launcher import launch, stop
from load import report_header

ROOT = Path(__file__).resolve().parents[1]


def role(process: psutil.Process) -> str:
    line = " ".join(process.cmdline())
    return line.split("triptych.components.")[1].split()[0] if "components." in line else "nats"


def cpu_seconds(processes: list[psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds of each process, all its threads included."""
    used = {}
    for process in processes:
        times = process.cpu_times()
        used[f"{role(process)}:{process.pid}"] = times.user + times.system
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", default="multimodal_disagg.sh")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm-up", type=int, default=4, help="requests before measuring")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/idle_cpu.json")
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "idle-cpu-launch.log"
    launcher, url = launch(args.topology, ["--engine", "hf"], log)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = chat_body(model, [picture(112)], "Describe it.", 8)
        body.pop("stream_options")
        body["stream"] = False
        for _ in range(args.warm_up):  # transfers connect NIXL agents to each other
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        processes = psutil.Process(launcher.pid).children(recursive=True)
        time.sleep(1.0)
        before = cpu_seconds(processes)
        began = time.monotonic()
        time.sleep(args.seconds)
        after = cpu_seconds(processes)
        elapsed = time.monotonic() - began
    finally:
        stop(launcher)
    busy = {name: (after[name] - before[name]) / elapsed for name in after}
    report = {
        **report_header(
            f"idle CPU per process, {args.topology}, hf engine on CPU, tiny Qwen2.5-VL"
        ),
        "seconds": elapsed,
        "cores_busy": {name: round(share, 4) for name, share in sorted(busy.items())},
        "cores_busy_total": round(sum(busy.values()), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["cores_busy"], indent=2))
    print(f"total: {report['cores_busy_total']:.3f} cores")


if __name__ == "__main__":
    main()
