"""No port is guessed: every server binds its own (port 0) and announces it, so stacks started
side by side never collide."""

from pathlib import Path

import httpx

from tests.stack import Stack
from triptych.runtime.nats_server import NatsServer
from triptych.runtime.port_file import read_port_file


def test_three_stacks_started_at_once_all_serve(nats_server: NatsServer, tmp_path: Path) -> None:
    stacks = [Stack(nats_server.url, tmp_path / f"stack{i}") for i in range(3)]
    try:
        for stack in stacks:  # every process of all three starts before any is waited for
            stack.tmp.mkdir()
            stack.start("encode", "encode_worker", "--engine", "mock")
            stack.start(
                "prefill",
                "prefill_worker",
                "--engine",
                "mock",
                "--dedicated-mm-encoder",
                "--port-file",
                str(stack.tmp / "prefill.port"),
            )
            stack.start(
                "decode",
                "decode_worker",
                "--engine",
                "mock",
                "--disaggregation-mode",
                "decode",
                "--dedicated-mm-encoder",
            )
            stack.frontend("E/P/D")
        for stack in stacks:  # twelve processes starting on the same cores: give them time
            stack.wait_ready(timeout=180)
        assert len({stack.http_port for stack in stacks}) == 3
        for stack in stacks:
            reply = httpx.post(
                f"{stack.url}/v1/chat/completions",
                json={
                    "model": "tiny-qwen2.5-vl",
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hello"}],
                },
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 3
            ports = read_port_file(stack.tmp / "prefill.port")
            assert ports is not None and set(ports) == {"status", "bootstrap"}
            health = httpx.get(f"http://127.0.0.1:{ports['status']}/health", timeout=5)
            assert health.status_code == 200
    finally:
        for stack in stacks:
            stack.stop()
