"""NVTX ranges for Nsight Systems: on only under ``DYN_NVTX=1``.

With the variable unset the ``nvtx`` module is never imported and `span` returns one shared,
do-nothing context manager: the cost is a function call. Ranges are process-wide start/end
pairs (not a per-thread push/pop stack), so concurrent requests on one event loop cannot
tangle each other's ranges; a range closes on success, failure and cancellation alike.

Range names (the reference system's): ``mm:enc:generate``, ``mm:enc:vision_encode``,
``mm:enc:embedding_transfer``, ``mm:nixl:begin_read``, ``mm:nixl:wait_completion``,
``mm:pd:generate``, ``mm:pd:generate_agg``, ``mm:pd:load_multimodal``,
``mm:pd:generate_disagg``, ``mm:prefill:bootstrap``, ``mm:prefill:load_multimodal``,
``mm:prefill:engine_async_generate``, ``mm:pd:ttft``, ``mm:dec:first_token``.
"""

import os
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

ENABLED = os.environ.get("DYN_NVTX", "").strip().lower() in {"1", "true", "yes", "on"}
"""Read once at import: profiling is decided when a process starts."""

_nvtx: Any = None


class Range:
    """One open NVTX range; `end` is idempotent (for ranges that end before their block)."""

    def __init__(self, name: str) -> None:
        self._id = _nvtx.start_range(message=name, domain="triptych")
        self._open = True

    def end(self) -> None:
        if self._open:
            self._open = False
            _nvtx.end_range(self._id)

    def __enter__(self) -> "Range":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.end()


class _NoRange:
    def end(self) -> None:
        pass

    def __enter__(self) -> "_NoRange":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NO_RANGE = _NoRange()
Mark = Range | _NoRange
"""A range ended by hand (`start`); a no-op when profiling is off."""


def span(name: str) -> AbstractContextManager[Any]:
    """``with span("mm:enc:generate"): ...`` brackets the block in an NVTX range."""
    if not ENABLED:
        return _NO_RANGE
    return Range(name)


def start(name: str) -> Mark:
    """A range to end by hand (e.g. at the first token); ends at the latest on ``__exit__``."""
    if not ENABLED:
        return _NO_RANGE
    return Range(name)


if ENABLED:
    import nvtx as _nvtx_module

    _nvtx = _nvtx_module
