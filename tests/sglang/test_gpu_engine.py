"""sglang.Engine itself, on a machine with a CUDA device and SGLang's kernels: E/P/D (SGLang's
PD disaggregation over NIXL) and E/PD on the sglang engine answer with the tokens of
transformers' greedy generate() on the tiny checkpoint. Skipped elsewhere (the reason says why).
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.sglang.conftest import requires_gpu
from tests.stack import ROOT
from tests.test_correctness import IMAGE_CASES, TEXT_CASES, Oracle, request, tokens_of

SERVING = re.compile(r"triptych is serving on (http://127\.0\.0\.1:[1-9][0-9]*) ")


@requires_gpu
@pytest.mark.parametrize("script", ["multimodal_disagg.sh", "multimodal_epd.sh"])
def test_sglang_engine_tokens_equal_generate(script: str, tmp_path: Path, tiny_model: Path) -> None:
    log_path = tmp_path / "launch.log"
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["PYTHON"] = sys.executable
    command = ["bash", str(ROOT / "launch" / script), "--engine", "sglang", "--device", "cuda"]
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [*command, "--http-port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while not (serving := SERVING.search(log_path.read_text())):
            assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        oracle = Oracle(tiny_model)
        cases = IMAGE_CASES + TEXT_CASES

        async def run() -> list[list[int]]:
            async with httpx.AsyncClient(base_url=serving[1], timeout=300) as client:
                return [await tokens_of(client, tiny_model.name, request(case)) for case in cases]

        for case, tokens in zip(cases, asyncio.run(run()), strict=True):
            assert tokens == oracle.tokens(case)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
