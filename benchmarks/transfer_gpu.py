"""Same-GPU transfers between two processes: NIXL READs under UCX settings vs CUDA IPC.

Two processes on one GPU, each with a `TransferAgent` over a VRAM pool; the importer READs a
tensor the exporter offers (the KV cache of one request is ~18 MB, its embeddings ~1.8 MB) and
the time per READ is compared with a device-to-device copy. Each UCX setting runs in fresh
processes (UCX reads its environment once). The last row maps the exporter's memory through
CUDA IPC (what PyTorch does when a CUDA tensor crosses processes) and copies from it.

    python benchmarks/transfer_gpu.py [--out FILE]
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_epd import copy_bandwidth
from load import utc_now

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1_835_008, 18_357_248, 64 << 20)
SETTINGS = {
    "UCX default": {},
    "UCX_TLS=cuda_ipc,cuda_copy,tcp": {"UCX_TLS": "cuda_ipc,cuda_copy,tcp"},
    "UCX_TLS=cuda_ipc,cuda_copy,tcp,self,sm": {"UCX_TLS": "cuda_ipc,cuda_copy,tcp,self,sm"},
}


def _exporter(conn: Any) -> None:
    from triptych.transfer import TransferAgent

    async def serve() -> None:
        agent = TransferAgent("exporter", "cuda", 256 << 20)
        await agent.start()
        for size in SIZES:
            tensor = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
            for attempt in range(6):
                key = f"t{size}-{attempt}"
                conn.send(agent.export(tensor, key))
                await agent.wait_released(key, 30)
        conn.send(None)
        await agent.close()

    asyncio.run(serve())


def nixl(setting: str) -> dict[str, Any]:
    from triptych.transfer import TransferAgent

    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    peer = context.Process(target=_exporter, args=(there,))
    peer.start()
    times: dict[int, list[float]] = {}

    async def read() -> None:
        agent = TransferAgent("importer", "cuda", 256 << 20)
        await agent.start()
        while (ref := await asyncio.to_thread(here.recv)) is not None:
            began = time.perf_counter()
            await agent.fetch(ref, 30)
            torch.cuda.synchronize()
            times.setdefault(int(ref.shape[0]), []).append(time.perf_counter() - began)
        await agent.close()

    asyncio.run(read())
    peer.join(30)
    return {
        str(size): {
            "ms_median": 1e3 * statistics.median(t[1:]),  # the first READ connects
            "gb_per_s": size / statistics.median(t[1:]) / 1e9,
        }
        for size, t in times.items()
    }


def _ipc_exporter(queue: Any, done: Any) -> None:
    tensors = [torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda") for size in SIZES]
    for tensor in tensors:
        queue.put(tensor)
    done.wait()


def cuda_ipc() -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue, done = context.Queue(), context.Event()
    peer = context.Process(target=_ipc_exporter, args=(queue, done))
    peer.start()
    out = {}
    for size in SIZES:
        shared = queue.get(timeout=60)
        local = torch.empty_like(shared)
        samples = []
        for _ in range(6):
            torch.cuda.synchronize()
            began = time.perf_counter()
            local.copy_(shared)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - began)
        out[str(size)] = {
            "ms_median": 1e3 * statistics.median(samples[1:]),
            "gb_per_s": size / statistics.median(samples[1:]) / 1e9,
        }
        del shared
    done.set()
    peer.join(30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/transfer_gpu.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(nixl(args.one) if args.one != "cuda_ipc" else cuda_ipc()))
        return
    summary: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "device_copy_bytes_per_s": copy_bandwidth("cuda"),
        "timestamp": utc_now(),
        "reads": {},
    }
    for setting in [*SETTINGS, "cuda_ipc"]:
        env = {**os.environ, **SETTINGS.get(setting, {})}
        run = subprocess.run(
            [sys.executable, __file__, "--one", setting],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        summary["reads"][setting] = json.loads(lines[-1]) if lines else run.stderr[-800:]
        print(setting, json.dumps(summary["reads"][setting]), flush=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
