"""NVTX under DYN_NVTX=1: every stage emits the ranges of its path, nested and closed, also
when the request fails; with DYN_NVTX unset the nvtx module is not even imported."""

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests.stack import ROOT, Stack, start_topology
from tests.test_correctness import image_part
from triptych.runtime.nats_server import NatsServer

RECORDER = Path(__file__).parent / "nvtx_recorder"
ENCODE = {"mm:enc:generate", "mm:enc:vision_encode", "mm:enc:embedding_transfer"}
NIXL = {"mm:nixl:begin_read", "mm:nixl:wait_completion"}
TOKENS = {"mm:pd:generate", "mm:pd:ttft", "mm:dec:first_token"}
PATHS = {
    "E/P/D": ENCODE
    | NIXL
    | TOKENS
    | {
        "mm:pd:generate_disagg",
        "mm:prefill:bootstrap",
        "mm:prefill:load_multimodal",
        "mm:prefill:engine_async_generate",
    },
    "E/PD": ENCODE | NIXL | TOKENS | {"mm:pd:generate_agg", "mm:pd:load_multimodal"},
}

Ranges = list[tuple[str, int, int]]


def recorded(directory: Path) -> dict[str, Ranges]:
    """Per process: (name, start, end) of every range; unclosed ranges fail here."""
    processes = {}
    for log in directory.glob("*.log"):
        open_ranges: dict[str, tuple[str, int]] = {}
        ranges: Ranges = []
        for line in log.read_text().splitlines():
            kind, range_id, stamp, *name = line.split(" ", 3)
            if kind == "start":
                open_ranges[range_id] = (name[0], int(stamp))
            else:
                label, begun = open_ranges.pop(range_id)
                ranges.append((label, begun, int(stamp)))
        assert not open_ranges, f"ranges left open: {open_ranges}"
        processes[log.stem] = ranges
    return processes


def assert_nested(ranges: Ranges) -> None:
    for name, start, end in ranges:
        for other, o_start, o_end in ranges:
            disjoint = end <= o_start or o_end <= start
            inside = o_start <= start and end <= o_end
            outside = start <= o_start and o_end <= end
            assert disjoint or inside or outside, f"{name} and {other} overlap"


def image_request() -> dict[str, object]:
    buffer = io.BytesIO()
    Image.effect_noise((84, 56), 40).convert("RGB").save(buffer, format="PNG")
    content = [image_part(buffer.getvalue()), {"type": "text", "text": "what?"}]
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": content}],
    }


def run_path(
    nats_url: str, tmp: Path, topology: str, *worker_args: str, engine: str = "hf"
) -> tuple[dict[str, Ranges], int]:
    records = tmp / "records"
    records.mkdir(parents=True)
    stack = Stack(
        nats_url,
        tmp,
        extra_env={
            "DYN_NVTX": "1",
            "NVTX_RECORD_DIR": str(records),
            "PYTHONPATH": os.pathsep.join([str(RECORDER), os.environ.get("PYTHONPATH", "")]),
        },
    )
    try:
        start_topology(stack, topology, *worker_args, engine=engine)
        status = httpx.post(
            f"{stack.url}/v1/chat/completions", json=image_request(), timeout=60
        ).status_code
    finally:
        stack.stop()
    return recorded(records), status


def test_epd_path_emits_every_range(
    nats_server: NatsServer, tmp_path: Path, tiny_model: Path
) -> None:
    for topology, expected in PATHS.items():
        processes, status = run_path(
            nats_server.url, tmp_path / topology.replace("/", "_"), topology
        )
        assert status == 200
        names = {name for ranges in processes.values() for name, _, _ in ranges}
        assert expected <= names, expected - names
        for ranges in processes.values():
            assert_nested(ranges)


def test_ranges_close_when_the_request_fails(
    nats_server: NatsServer, tmp_path: Path, tiny_model: Path
) -> None:
    processes, status = run_path(
        nats_server.url, tmp_path, "E/P/D", "--mock-fail-prefill", engine="mock"
    )
    assert status == 500
    names = {name for ranges in processes.values() for name, _, _ in ranges}
    assert {"mm:pd:generate", "mm:prefill:engine_async_generate", "mm:enc:generate"} <= names
    for ranges in processes.values():
        assert_nested(ranges)


def test_nvtx_is_not_imported_when_off() -> None:
    code = (
        "import sys; import triptych.observability.nvtx as n; "
        "import triptych.components.decode_worker.handler; "
        "assert not n.ENABLED and 'nvtx' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k != "DYN_NVTX"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
