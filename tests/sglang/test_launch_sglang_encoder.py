"""SGLang's encoder in front of the hf engine, through real processes, NATS and NIXL:
``PYTHON=.venv-sglang/bin/python launch/multimodal_disagg.sh --engine hf --encode-engine sglang``
(E/P/D) and ``launch/multimodal_epd.sh`` (E/PD) answer image requests with the tokens of
transformers' greedy ``generate()``."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import ROOT, announced_url, stop_launcher
from tests.test_correctness import IMAGE_CASES, TEXT_CASES, Oracle, request, served_tokens

SCRIPTS = ["multimodal_disagg.sh", "multimodal_epd.sh"]


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
        url = announced_url(launcher, log_path, 300)
        encoders = [p for p in _children(launcher.pid) if "encode_worker" in p and "sglang" in p]
        assert encoders, "no encode worker on the sglang engine"
        yield url
    finally:
        stop_launcher(launcher)


def _children(pid: int) -> list[str]:
    import psutil

    return [" ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True)]


@pytest.fixture(scope="module")
def oracle(tiny_model: Path) -> Oracle:
    return Oracle(tiny_model)


def test_tokens_equal_generate(served: str, oracle: Oracle, tiny_model: Path) -> None:
    cases = IMAGE_CASES + TEXT_CASES[:1]
    sequential = [request(case, stream=i % 2 == 0) for i, case in enumerate(cases)]
    got = served_tokens(served, tiny_model.name, sequential)
    got += served_tokens(served, tiny_model.name, [request(c) for c in cases], together=True)
    for case, tokens in zip(cases + cases, got, strict=True):
        assert tokens == oracle.tokens(case)
