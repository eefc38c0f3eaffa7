"""Without CUDA or SGLang's kernels, a prefill, decode or aggregated worker on the sglang engine
refuses to start at once, with one line that says why (before it joins NATS or loads anything).
"""

import subprocess
from pathlib import Path

import pytest

from tests.sglang.conftest import gpu_runtime
from tests.stack import ROOT, component_command

pytestmark = pytest.mark.skipif(gpu_runtime() is None, reason="this machine can run sglang.Engine")

WORKERS = [
    ("prefill", ["prefill_worker", "--dedicated-mm-encoder"]),
    ("decode", ["decode_worker", "--disaggregation-mode", "decode"]),
    ("decode", ["decode_worker", "--disaggregation-mode", "agg", "--dedicated-mm-encoder"]),
]


def start(args: list[str], tiny_model: Path) -> subprocess.CompletedProcess[str]:
    module, *flags = args
    return subprocess.run(
        component_command(module, *flags, "--model-path", str(tiny_model)),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"NATS_URL": "nats://127.0.0.1:1", "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(("role", "args"), WORKERS, ids=["prefill", "decode", "agg"])
def test_refuses_without_cuda_in_one_line(role: str, args: list[str], tiny_model: Path) -> None:
    done = start([*args, "--engine", "sglang"], tiny_model)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"triptych {role} worker refuses to start: engine 'sglang' cannot run {role} here: "
        "no CUDA device is visible (sglang.Engine's scheduler runs on NVIDIA GPUs only); use "
        "--engine hf for this stage, e.g. --engine hf --encode-engine sglang"
    ], done.stderr


def test_refuses_an_sglang_encoder_beside_an_sglang_engine(tiny_model: Path) -> None:
    done = start(
        ["decode_worker", "--disaggregation-mode", "agg", "--engine", "sglang"], tiny_model
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "MMEncoder and sglang.Engine cannot share a process" in line
    assert "--encode-engine hf" in line
