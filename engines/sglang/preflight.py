"""Whether this process can run an ``sglang`` role, decided in seconds, said in one line."""

import importlib.util

SGLANG_VERSION = "0.5.23"


class EngineUnavailable(Exception):
    """This machine or interpreter cannot run the requested engine; the message says why."""


def require_sglang() -> None:
    """SGLang is installed in this interpreter (its own venv: ``make setup-sglang``)."""
    if importlib.util.find_spec("sglang") is None:
        raise EngineUnavailable(
            f"engine 'sglang' needs SGLang {SGLANG_VERSION} in this interpreter: run "
            "`make setup-sglang` and start triptych with PYTHON=.venv-sglang/bin/python"
        )


def require_gpu_runtime(role: str) -> None:
    """``sglang.Engine``'s scheduler needs a CUDA device and SGLang's kernels (``sgl_kernel``)."""
    require_sglang()
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable(
            f"engine 'sglang' cannot run {role} here: no CUDA device is visible "
            "(sglang.Engine's scheduler runs on NVIDIA GPUs only); use --engine hf for this "
            "stage, e.g. --engine hf --encode-engine sglang"
        )
    if importlib.util.find_spec("sgl_kernel") is None:
        raise EngineUnavailable(
            f"engine 'sglang' cannot run {role} here: SGLang's kernels (the sgl_kernel module, "
            "package sglang-kernel) are not installed in this interpreter"
        )
