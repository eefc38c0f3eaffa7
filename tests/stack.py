"""Real triptych processes for tests: start components, wait until ready, stop or kill them."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from triptych.runtime.port_file import read_port_file

ROOT = Path(__file__).resolve().parents[1]

FAST_MOCK = {
    "TRIPTYCH_MOCK_ENCODE_S_PER_IMAGE": "0",
    "TRIPTYCH_MOCK_PREFILL_S_PER_TOKEN": "0",
    "TRIPTYCH_MOCK_DECODE_S_PER_STEP": "0",
}
"""The mock engine at zero cost (its defaults are a real model's), for tests that need speed;
a test's own --mock-* flags still win."""


@dataclass
class Process:
    """One component process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.popen.kill()
        self.popen.wait()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def output(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(errors="replace")


@dataclass
class Stack:
    """A set of component processes sharing one NATS namespace."""

    nats_url: str
    tmp: Path
    namespace: str = field(default_factory=lambda: f"t{os.getpid()}x{time.monotonic_ns()}")
    processes: list[Process] = field(default_factory=list)
    http_port: int = 0
    """The frontend's port, once it announced it (it binds a free one itself)."""
    nats_token: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    _port_file: Path = field(default=Path("/nonexistent"), repr=False)

    def env(self) -> dict[str, str]:
        """Environment of every process of this stack."""
        env = dict(os.environ)
        env.update(FAST_MOCK)
        env.update(NATS_URL=self.nats_url, TRIPTYCH_NAMESPACE=self.namespace, PYTHONUNBUFFERED="1")
        if self.nats_token:
            env["NATS_TOKEN"] = self.nats_token
        env.update(self.extra_env)
        return env

    def start(
        self, name: str, module: str, *args: str, env: dict[str, str] | None = None
    ) -> Process:
        """Start ``python -m triptych.components.<module> args...`` (`env`: variables of its
        own)."""
        log = self.tmp / f"{name}-{len(self.processes)}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", f"triptych.components.{module}", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**self.env(), **(env or {})},
            cwd=ROOT,
        )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def frontend(self, topology: str, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start the frontend on a port it picks; `wait_ready` learns which."""
        self.http_port = 0
        self._port_file = self.tmp / f"frontend-{len(self.processes)}.port"
        return self.start(
            "frontend",
            "frontend",
            "--topology",
            topology,
            "--http-port",
            "0",
            "--port-file",
            str(self._port_file),
            *args,
            env=env,
        )

    @property
    def url(self) -> str:
        """Base URL of the frontend."""
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait until the frontend announced its port and its /ready answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.name} exited:\n{process.output()}")
            if not self.http_port:
                ports = read_port_file(self._port_file)
                if ports is None:
                    time.sleep(0.05)
                    continue
                self.http_port = ports["http"]
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.processes)
        raise TimeoutError(f"stack not ready in {timeout}s\n{logs}")

    def stop(self) -> None:
        """SIGTERM every process (frontend first), then SIGKILL stragglers."""
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def start_topology(
    stack: Stack,
    topology: str,
    *worker_args: str,
    copies: int = 1,
    frontend_args: tuple[str, ...] = (),
    engine: str = "mock",
    model_path: str = "",
    ready_timeout: float = 300,
) -> Stack:
    """Start the workers of a topology (`copies` of each) and its frontend."""
    model = ("--model-path", model_path) if model_path else ()
    args = ("--engine", engine, *model, *worker_args)
    frontend_args = (*model, *frontend_args)
    for _ in range(copies):
        if topology == "E/P/D":
            stack.start("encode", "encode_worker", *args)
            stack.start("prefill", "prefill_worker", "--dedicated-mm-encoder", *args)
            stack.start(
                "decode",
                "decode_worker",
                "--disaggregation-mode",
                "decode",
                "--dedicated-mm-encoder",
                *args,
            )
        elif topology == "E/PD":
            stack.start("encode", "encode_worker", *args)
            stack.start(
                "decode",
                "decode_worker",
                "--disaggregation-mode",
                "agg",
                "--dedicated-mm-encoder",
                *args,
            )
        elif topology == "EPD":
            stack.start("decode", "decode_worker", "--disaggregation-mode", "agg", *args)
        elif topology == "P/D":
            stack.start("prefill", "prefill_worker", *args)
            stack.start("decode", "decode_worker", "--disaggregation-mode", "decode", *args)
    stack.frontend(topology, *frontend_args)
    stack.wait_ready(ready_timeout)
    return stack


async def micro_stats(stack: Stack, component: str) -> dict[str, dict[str, Any]]:
    """Every live instance's NATS micro STATS: {instance: {"requests": n, **gauges}}, where
    `requests` counts the calls the instance received by NATS or on a direct link."""
    import json

    import nats

    nc = await nats.connect(stack.nats_url, token=stack.nats_token or None)
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        answers.append(json.loads(msg.data))

    await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.STATS.{stack.namespace}-{component}", b"", reply=inbox)
    await asyncio.sleep(0.3)
    await nc.close()
    return {str(a["id"]): dict(a["endpoints"][0].get("data") or {}) for a in answers}
