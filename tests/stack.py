"""Real triptych processes for tests: start components, wait until ready, stop or kill them."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from triptych.components.topology import TOPOLOGIES
from triptych.runtime.port_file import read_port_file

ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"triptych is serving on (http://127\.0\.0\.1:[1-9][0-9]*) ")
"""What a launch script or ``triptych serve`` logs once its frontend's /ready answers 200."""

FAST_MOCK = {
    "TRIPTYCH_MOCK_ENCODE_S_PER_IMAGE": "0",
    "TRIPTYCH_MOCK_PREFILL_S_PER_TOKEN": "0",
    "TRIPTYCH_MOCK_DECODE_S_PER_STEP": "0",
}
"""The mock engine at zero cost (its defaults are a real model's), for tests that need speed;
a test's own --mock-* flags still win."""


def component_command(module: str, *args: str) -> list[str]:
    """``python -m triptych.components.<module> args...`` with this interpreter."""
    return [sys.executable, "-m", f"triptych.components.{module}", *args]


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
            self.command(module, *args),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**self.env(), **(env or {})},
            cwd=ROOT,
        )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def command(self, module: str, *args: str) -> list[str]:
        """The command line that starts component `module` with `args`."""
        return component_command(module, *args)

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

    def wait_ready(self, timeout: float = 300, instances: int = 1) -> None:
        """Wait until the frontend announced its port, its /ready answers 200 and it sees at
        least `instances` instances of every stage it calls (one is enough for 200, and a test
        that started more may depend on where requests go)."""
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
                ready = httpx.get(f"{self.url}/ready", timeout=1)
                seen = ready.json().get("instances", {}) if ready.status_code == 200 else {}
                if seen and min(seen.values()) >= instances:
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
    envs: Mapping[str, dict[str, str]] | None = None,
) -> Stack:
    """Start the workers of a topology (`copies` of each) and its frontend (`envs`: variables
    of their own, by process name: encode, prefill, decode, frontend)."""
    model = ("--model-path", model_path) if model_path else ()
    args = ("--engine", engine, *model, *worker_args)
    frontend_args = (*model, *frontend_args)
    envs = envs or {}
    for _ in range(copies):
        for worker in TOPOLOGIES[topology].workers:
            name = worker.module.removesuffix("_worker")  # the component it enters by
            stack.start(name, worker.module, *worker.args, *args, env=envs.get(name))
    stack.frontend(topology, *frontend_args, env=envs.get("frontend"))
    stack.wait_ready(ready_timeout, instances=copies)
    return stack


@contextmanager
def serving(
    nats_url: str,
    tmp: Path,
    topology: str,
    *worker_args: str,
    frontend_args: tuple[str, ...] = (),
    engine: str = "mock",
    model_path: str = "",
    ready_timeout: float = 300,
    envs: Mapping[str, dict[str, str]] | None = None,
) -> Iterator[Stack]:
    """A fresh stack running `topology` (as `start_topology` starts it), stopped on leaving."""
    stack = Stack(nats_url, tmp)
    try:
        yield start_topology(
            stack,
            topology,
            *worker_args,
            frontend_args=frontend_args,
            engine=engine,
            model_path=model_path,
            ready_timeout=ready_timeout,
            envs=envs,
        )
    finally:
        stack.stop()


ServeHf = Callable[..., AbstractContextManager[Stack]]
"""The `serve_hf` fixture: `serving` on the hf engine, bound to the session's NATS server."""


def announced_url(launcher: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The URL a launch script logs (`SERVING`) once it serves; fails with its log if it exits
    or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (serving := SERVING.search(log.read_text(errors="replace"))):
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    return serving[1]


def stop_launcher(launcher: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM a launch script still running (it stops its workers, then NATS); SIGKILL its
    whole process group if it takes longer than `timeout` seconds."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)


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
