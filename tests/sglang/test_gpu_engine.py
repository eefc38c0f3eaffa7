"""sglang.Engine itself, on a machine with a CUDA device and SGLang's kernels: E/P/D (SGLang's
PD disaggregation over NIXL) and E/PD on the sglang engine answer with the tokens of
transformers' greedy generate() on the tiny checkpoint. Skipped elsewhere (the reason says why).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sglang.conftest import requires_gpu
from tests.stack import ROOT, announced_url, stop_launcher
from tests.test_correctness import IMAGE_CASES, TEXT_CASES, Oracle, request, served_tokens


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
        url = announced_url(launcher, log_path, 600)
        oracle = Oracle(tiny_model)
        cases = IMAGE_CASES + TEXT_CASES
        bodies = [request(case) for case in cases]
        got = served_tokens(url, tiny_model.name, bodies, timeout=300)
        for case, tokens in zip(cases, got, strict=True):
            assert tokens == oracle.tokens(case)
    finally:
        stop_launcher(launcher)
