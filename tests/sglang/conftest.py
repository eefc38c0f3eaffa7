"""The SGLang lane: these tests run with ``.venv-sglang``'s interpreter (``make unit-sglang``),
where SGLang 0.5.23 and its CUDA build of torch live; other interpreters do not collect them."""

import importlib.util

import pytest

if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]


def gpu_runtime() -> str | None:
    """Why sglang.Engine cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device (sglang.Engine's scheduler runs on NVIDIA GPUs only)"
    if importlib.util.find_spec("sgl_kernel") is None:
        return "needs SGLang's kernels (sgl_kernel)"
    return None


requires_gpu = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None or gpu_runtime() is not None,
    reason=f"sglang.Engine {gpu_runtime() if importlib.util.find_spec('sglang') else ''}",
)
"""For tests that run sglang.Engine itself."""
