"""SGLang's encoder in front of the hf engine, through real processes, NATS and NIXL:
``PYTHON=.venv-sglang/bin/python launch/multimodal_disagg.sh --engine hf --encode-engine sglang``
(E/P/D) and ``launch/multimodal_epd.sh`` (E/PD) answer image requests with the tokens of
transformers' greedy ``generate()``."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import ROOT
from tests.test_correctness import IMAGE_CASES, TEXT_CASES, Oracle, request, tokens_of

SCRIPTS = ["multimodal_disagg.sh", "multimodal_epd.sh"]
SERVING = re.compile(r"triptych is serving on (http://127\.0\.0\.1:[1-9][0-9]*) ")


@pytest.fixture(scope="module", params=SCRIPTS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("launch") / "launch.log"
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["PYTHON"] = sys.executable
    command = ["bash", str(ROOT / "launch" / request.param), "--engine", "hf"]
    command += ["--encode-engine", "sglang", "--http-port", "0"]
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert launcher.poll() is None, log_path.read_text()
            serving = SERVING.search(log_path.read_text())
            if serving:  # the launcher says so once /ready answers 200
                url = serving[1]
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(log_path.read_text())
        encoders = [p for p in _children(launcher.pid) if "encode_worker" in p and "sglang" in p]
        assert encoders, "no encode worker on the sglang engine"
        yield url
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)


def _children(pid: int) -> list[str]:
    import psutil

    return [" ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True)]


@pytest.fixture(scope="module")
def oracle(tiny_model: Path) -> Oracle:
    return Oracle(tiny_model)


def test_tokens_equal_generate(served: str, oracle: Oracle, tiny_model: Path) -> None:
    cases = IMAGE_CASES + TEXT_CASES[:1]

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=served, timeout=120) as client:
            sequential = [
                await tokens_of(client, tiny_model.name, request(case, stream=i % 2 == 0))
                for i, case in enumerate(cases)
            ]
            together = await asyncio.gather(
                *(tokens_of(client, tiny_model.name, request(case)) for case in cases)
            )
            return sequential + list(together)

    got = asyncio.run(run())
    for case, tokens in zip(cases + cases, got, strict=True):
        assert tokens == oracle.tokens(case)
