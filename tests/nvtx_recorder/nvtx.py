"""A stand-in for the ``nvtx`` package that records ranges to $NVTX_RECORD_DIR/<pid>.log."""

import itertools
import os
import time
from typing import Any

_ids = itertools.count(1)
_path = os.path.join(os.environ["NVTX_RECORD_DIR"], f"{os.getpid()}.log")


def _write(line: str) -> None:
    with open(_path, "a") as record:
        record.write(line + "\n")


def start_range(message: str | None = None, **_: Any) -> int:
    range_id = next(_ids)
    _write(f"start {range_id} {time.monotonic_ns()} {message}")
    return range_id


def end_range(range_id: int) -> None:
    _write(f"end {range_id} {time.monotonic_ns()}")
